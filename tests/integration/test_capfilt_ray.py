"""CapFilt's Ray Data executor against the in-process one: same input, same seed -> the same kept captions
(and scores within 1e-5), the same corrupt shard reported. Local Ray on loopback, shut down at the end."""
import io
import json
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

import capfilt_support as support
from pipelines.capfilt import CapfiltConfig, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def kept_by_key(out) -> dict[str, list[str]]:
    kept = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    kept[member.name[:-5]] = json.loads(tar.extractfile(member).read())["capfilt"]["kept"]
    return kept


def test_ray_and_local_executors_agree(tmp_path, local_ray):
    import ray

    shards = support.web_shards(tmp_path / "web", images=20, per_shard=8)  # 8 + 8 + 4 images
    support.truncate(shutil.copy(shards[0], shards[0].parent / "00009.tar"))  # a damaged copy
    with tarfile.open(shards[0].parent / "00008.tar", "w") as tar:  # a sound tar without one usable sample
        info = tarfile.TarInfo("00000099.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"a cat"))
    base = dict(shards=str(shards[0].parent), captioner=str(support.tiny_blip(tmp_path / "blip")),
                ranker=f"local-dir:{support.tiny_clip(tmp_path / 'clip')}", num_captions=3, max_new_tokens=12,
                min_new_tokens=2, device="cpu", seed=7, captioner_weight=0.3)  # the Ray path's log-likelihoods
    local = run(CapfiltConfig(**base, executor="local", batch_size=8), str(tmp_path / "local"))
    distributed = run(CapfiltConfig(**base, executor="ray", batch_size=3, ray_actors=1, ray_actor_cpus=0.5),
                      str(tmp_path / "ray"))
    assert ray.is_initialized()  # run() leaves a Ray it did not start running

    assert (local.executor, distributed.executor) == ("local", "ray")
    for result in (local, distributed):
        assert (result.images, result.shards_written, result.candidates) == (20, 4, 60)
        assert [c["shard"] for c in result.corrupt_shards] == ["00009"]
    assert distributed.skipped == local.skipped and sum(local.skipped.values()) > 1  # the lone caption, the damage
    for out in (tmp_path / "local", tmp_path / "ray"):  # the empty shard written empty by both
        assert pq.read_table(out / "00008.parquet").num_rows == 0 and not tarfile.open(out / "00008.tar").getmembers()
    assert kept_by_key(tmp_path / "ray") == kept_by_key(tmp_path / "local")
    for name in ("00000", "00001", "00002"):
        a = pq.read_table(tmp_path / "local" / f"{name}.parquet").to_pylist()
        b = pq.read_table(tmp_path / "ray" / f"{name}.parquet").to_pylist()
        assert [(r["key"], r["caption"], r["kept"]) for r in a] == [(r["key"], r["caption"], r["kept"]) for r in b]
        assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < 1e-5
        assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b) if x["source"] == "synthetic") < 1e-5
    for field in ("web_precision", "synthetic_precision", "kept_precision", "web_kept_share"):
        assert getattr(distributed, field) == pytest.approx(getattr(local, field))
    assert distributed.captions_per_second > 0 and distributed.images_ranked_per_second > 0
