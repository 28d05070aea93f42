"""The training loader on small hand-made shards in img2dataset's webdataset layout."""
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.config import ConfigError
from pipelines.data.loader import LoaderConfig, MixedStream, SourceConfig, TrainLoader, _sample_bytes
from pipelines.data.shards import SkipCounter
from pipelines.data.transforms import (CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform,
                                       clean_caption, swap_left_right)


def jpeg_bytes(color=(200, 30, 30), size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, keys, caption=lambda k: f"Sample {k}.", meta=lambda k: {}, broken=()):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            if key in broken and broken[key] == "corrupt":
                add_member(tar, f"{key}.jpg", b"\xff\xd8 this is not a jpeg")
            elif not (key in broken and broken[key] == "no_image"):
                add_member(tar, f"{key}.jpg", jpeg_bytes())
            add_member(tar, f"{key}.txt", caption(key).encode())
            add_member(tar, f"{key}.json", json.dumps({"key": key, **meta(key)}).encode())


def make_source(root: Path, name: str, shards: int, per_shard: int, **kw) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for s in range(shards):
        write_shard(folder / f"{s:05d}.tar", [f"{name}{s:02d}{i:03d}" for i in range(per_shard)], **kw)
    return folder


def config(sources, **kw) -> LoaderConfig:
    base = dict(image_size=16, batch_size=4, shuffle_buffer=0, num_workers=0, seed=1)
    base.update(kw)
    return LoaderConfig(sources=[SourceConfig(**s) for s in sources], **base)


def draw_keys(loader: TrainLoader, batches: int) -> list[str]:
    keys = []
    for i, batch in enumerate(loader):
        keys += batch["key"]
        if i + 1 == batches:
            break
    return keys


def test_batch_shapes_and_clean_captions(tmp_path):
    src = make_source(tmp_path, "a", shards=2, per_shard=6, caption=lambda k: f"A (Red) circle:  {k}!")
    batch = next(iter(TrainLoader(config([{"name": "a", "shards": str(src)}], train_transform=False))))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert all(t == clean_caption(f"A (Red) circle:  {k}!") for t, k in zip(batch["text"], batch["key"]))
    assert batch["text"][0].startswith("a red circle a")


def test_mixing_follows_declared_ratios(tmp_path):
    a = make_source(tmp_path, "a", shards=2, per_shard=20)
    b = make_source(tmp_path, "b", shards=2, per_shard=20)
    cfg = config([{"name": "a", "shards": str(a), "weight": 3}, {"name": "b", "shards": str(b), "weight": 1}],
                 batch_size=50)
    loader = TrainLoader(cfg)
    sources = Counter()
    for i, batch in enumerate(loader):
        sources.update(batch["source"])
        if i == 15:
            break
    share_a = sources["a"] / sum(sources.values())
    assert abs(share_a - 0.75) < 0.04, sources
    assert loader.report()["drawn"] == dict(sources)


@pytest.mark.parametrize("shards, per_shard", [(4, 10), (1, 40)])  # split by shard / by sample
def test_ranks_read_disjoint_data_covering_the_epoch(tmp_path, shards, per_shard):
    src = make_source(tmp_path, "a", shards=shards, per_shard=per_shard)
    seen = []
    for rank in range(2):
        loader = TrainLoader(config([{"name": "a", "shards": str(src)}]), rank=rank, world_size=2)
        seen.append(draw_keys(loader, 5))  # 5 batches x 4 = 20 = half an epoch
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == shards * per_shard


def test_dataloader_workers_read_disjoint_data(tmp_path):
    src = make_source(tmp_path, "a", shards=4, per_shard=8)
    loader = TrainLoader(config([{"name": "a", "shards": str(src)}], num_workers=2))
    keys = draw_keys(loader, 8)  # 32 samples = one epoch over both workers
    assert len(keys) == len(set(keys)) == 32


def test_resume_continues_with_unseen_data(tmp_path):
    a = make_source(tmp_path, "a", shards=3, per_shard=10)
    b = make_source(tmp_path, "b", shards=1, per_shard=12)
    cfg = config([{"name": "a", "shards": str(a), "weight": 2}, {"name": "b", "shards": str(b)}])
    uninterrupted = draw_keys(TrainLoader(cfg), 6)
    first = TrainLoader(cfg)
    before = draw_keys(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (state.json)
    resumed = TrainLoader(cfg, state=state)
    after = draw_keys(resumed, 3)
    assert before + after == uninterrupted
    assert resumed.report()["drawn"] == dict(Counter(k[0] for k in uninterrupted))


def test_resume_with_shuffle_buffer_never_repeats(tmp_path):
    src = make_source(tmp_path, "a", shards=4, per_shard=10)
    cfg = config([{"name": "a", "shards": str(src)}], shuffle_buffer=8)
    first = TrainLoader(cfg)
    before = draw_keys(first, 3)
    after = draw_keys(TrainLoader(cfg, state=first.state_dict()), 3)
    assert not set(before) & set(after)


def test_resume_refuses_a_different_reader_layout(tmp_path):
    src = make_source(tmp_path, "a", shards=2, per_shard=8)
    cfg = config([{"name": "a", "shards": str(src)}])
    first = TrainLoader(cfg)
    draw_keys(first, 1)
    with pytest.raises(ConfigError, match="readers"):
        TrainLoader(cfg, rank=0, world_size=2, state=first.state_dict())


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_shard(folder / "00000.tar", [f"k{i}" for i in range(10)],
                broken={"k2": "corrupt", "k5": "no_image"})
    write_shard(folder / "00001.tar", [f"t{i}" for i in range(10)])
    whole = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut mid-member
    loader = TrainLoader(config([{"name": "bad", "shards": str(folder)}], batch_size=2))
    keys = draw_keys(loader, 10)  # 20 draws: more than one epoch of the ~13 readable samples
    assert "k2" not in keys and "k5" not in keys
    skipped = loader.report()["skipped"]["bad"]
    assert skipped["corrupt_image"] >= 1 and skipped["missing_image"] >= 1
    assert skipped["truncated_or_unreadable_shard"] >= 1
    assert any(k.startswith("t") for k in keys)  # the readable part of the truncated shard is used


def test_capfilt_kept_captions_are_drawn_at_random(tmp_path):
    src = make_source(tmp_path, "web", shards=1, per_shard=3, caption=lambda k: "web alt text",
                      meta=lambda k: {"capfilt": {"kept": ["first kept", "second kept"]}})
    loader = TrainLoader(config([{"name": "web", "shards": str(src)}], batch_size=3))
    texts = Counter()
    for i, batch in enumerate(loader):
        texts.update(batch["text"])
        if i == 20:
            break
    assert set(texts) == {"first kept", "second kept"}
    assert min(texts.values()) > 15  # both are used, roughly half and half of 63


def varied_source(root: Path) -> Path:
    """3 shards x 5 samples, each image its own colour and size, one corrupt image."""
    folder = root / "a"
    folder.mkdir()
    for s in range(3):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(5):
                key = f"a{s}{i}"
                image = jpeg_bytes((40 * s + 10, 50 * i, 120), size=20 + 2 * i)
                add_member(tar, f"{key}.jpg", b"not a jpeg" if key == "a12" else image)
                add_member(tar, f"{key}.txt", f"sample {key} on the left".encode())
    return folder


def draw_batches(iterator, count: int) -> list[tuple]:
    return [(batch["image"], batch["text"], batch["key"]) for _, batch in zip(range(count), iterator)]


@pytest.mark.parametrize("train_transform", [False, True])
def test_memory_cache_gives_the_same_batches_and_reads_each_shard_once(tmp_path, train_transform):
    src = varied_source(tmp_path)
    cfg = config([{"name": "a", "shards": str(src)}], shuffle_buffer=4, train_transform=train_transform)
    plain = TrainLoader(cfg)
    expected = draw_batches(iter(plain), 12)  # 48 draws: over three epochs of the 14 readable samples
    cached = TrainLoader(cfg.model_copy(update={"cache_mb": 1.0}))
    stream = iter(cached)
    got = draw_batches(stream, 5)  # 20 draws: the first epoch is read whole
    src.rename(tmp_path / "gone")  # later epochs come from memory
    got += draw_batches(stream, 7)
    for (image, text, key), (image_c, text_c, key_c) in zip(expected, got, strict=True):
        assert key == key_c and text == text_c
        assert torch.equal(image, image_c)
    assert plain.report()["skipped"]["a"]["corrupt_image"] >= 3  # once per epoch
    assert cached.report()["skipped"]["a"] == {"corrupt_image": 1}  # once


def test_deterministic_batches_are_the_eval_transform_of_each_image(tmp_path):
    src = varied_source(tmp_path)
    cfg = config([{"name": "a", "shards": str(src)}], shuffle_buffer=4, cache_mb=1.0)
    images = {}
    for member in sorted(src.glob("*.tar")):
        with tarfile.open(member) as tar:
            for info in tar.getmembers():
                if info.name.endswith(".jpg") and not info.name.startswith("a12"):
                    images[info.name[:-4]] = Image.open(io.BytesIO(tar.extractfile(info).read())).convert("RGB")
    transform = EvalTransform(cfg.image_size)
    for batch in draw_batches(iter(TrainLoader(cfg)), 8):  # 32 draws: later epochs from memory
        for image, text, key in zip(*batch):
            assert torch.equal(image, transform(images[key], text)[0]), key


def test_a_deterministic_sample_is_held_as_its_uint8_pixels_only(tmp_path):
    src = make_source(tmp_path, "a", 1, 2)
    stream = MixedStream(config([{"name": "a", "shards": str(src)}], image_size=16, cache_mb=1.0,
                                train_transform=False))
    with tarfile.open(next(src.glob("*.tar"))) as tar:
        raw = {info.name.split(".", 1)[1]: tar.extractfile(info).read() for info in tar.getmembers()
               if info.name.startswith("a00000.")}
    raw.update({"__key__": "a00000", "__url__": str(src)})
    sample = stream._decode(raw, SkipCounter())
    assert "image" not in sample and sample["pixels"].dtype == torch.uint8 and sample["pixels"].shape == (3, 16, 16)
    assert _sample_bytes(sample) == 3 * 16 * 16 + len(json.dumps(sample["meta"])) + len(sample["text"])


def test_memory_cache_keeps_no_shard_beyond_its_budget(tmp_path):
    src = varied_source(tmp_path)
    cfg = config([{"name": "a", "shards": str(src)}], cache_mb=1e-4)  # ~100 bytes: less than one shard
    stream = iter(TrainLoader(cfg))
    draw_batches(stream, 4)
    src.rename(tmp_path / "gone")
    with pytest.raises(RuntimeError, match="no readable samples"):
        draw_batches(stream, 8)


def test_missing_shards_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match="source 'web'"):
        TrainLoader(config([{"name": "web", "shards": str(tmp_path / "nothing")}]))
    with pytest.raises(ValueError, match="unique"):
        config([{"name": "a", "shards": "x"}, {"name": "a", "shards": "y"}])


def test_flip_swaps_left_and_right_in_the_caption():
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 32))  # red on the left half
    transform = TrainTransform(32, scale=(1.0, 1.0), flip_p=1.0)
    tensor, caption = transform(image, "a red square on the left, right of nothing", random.Random(0))
    assert caption == "a red square on the right, left of nothing"
    pixels = tensor * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert pixels[0, :, 24:].mean() > 0.9 and pixels[0, :, :8].mean() < 0.1  # red is now on the right
    kept, caption = TrainTransform(32, scale=(1.0, 1.0), flip_p=0.0)(image, "on the left", random.Random(0))
    assert caption == "on the left"


def test_flip_rate_and_crop_size():
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    rng = random.Random(3)
    transform = TrainTransform(24)
    flipped = sum(transform(image, "left", rng)[1] == "right" for _ in range(400))
    assert 160 < flipped < 240
    assert EvalTransform(24)(image, "x")[0].shape == (3, 24, 24)


def test_caption_helpers():
    assert clean_caption('A "Big" (red) circle... on the LEFT!  ') == "a big red circle on the left"
    assert clean_caption(" ".join(["w"] * 60), max_words=50).count("w") == 50
    assert swap_left_right("Left of the leftmost, right") == "Right of the leftmost, left"
