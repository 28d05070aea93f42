"""CapFilt (SPEC section 6), in-process on tiny random models: output layout, the top-2 filter, summary
figures against the shapes-world checker, determinism, resume, corrupt shards, validation, and the three
captioner kinds (HF BLIP, HF BLIP-2, our stage-2 checkpoint)."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import capfilt_support as support
from pipelines import capfilt
from pipelines.capfilt import CapfiltConfig, main, run
from pipelines.capfilt_models import (ClipRanker, KeyedNucleusSampler, Sampling, load_captioner, rank_candidates,
                                      row_uniforms)
from pipelines.config import ConfigError, load_config
from pipelines.shapes.checker import check_caption
from pipelines.shapes.scene import Scene

K = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread avoids OpenMP spinning against the other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    support.web_shards(root / "web", images=16, per_shard=8)
    return {"root": root, "shards": root / "web" / "shards", "blip": support.tiny_blip(root / "blip"),
            "clip": support.tiny_clip(root / "clip")}


def config(assets, **fields) -> CapfiltConfig:
    base = dict(shards=str(assets["shards"]), captioner=str(assets["blip"]), ranker=f"local-dir:{assets['clip']}",
                num_captions=K, max_new_tokens=12, min_new_tokens=2, batch_size=4, executor="local", device="cpu")
    return CapfiltConfig(**{**base, **fields})


@pytest.fixture(scope="module")
def first_run(assets):
    out = assets["root"] / "out"
    return run(config(assets), str(out)), out


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def kept_by_key(out: Path) -> dict[str, list[str]]:
    return {key: json.loads(parts["json"])["capfilt"]["kept"]
            for tar in sorted(out.glob("*.tar")) for key, parts in read_tar(tar).items()}


# ----------------------------------------------------------------------------------------- end to end
def test_outputs_layout_and_top_two(assets, first_run):
    result, out = first_run
    for name in ("00000.tar", "00000.parquet", "00001.tar", "00001.parquet", "summary.json", "_SUCCESS.json",
                 "capfilt_config.yaml", "capfilt_scores.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "capfilt_scores.png").format == "PNG"
    for shard in ("00000", "00001"):
        source, written = read_tar(assets["shards"] / f"{shard}.tar"), read_tar(out / f"{shard}.tar")
        assert list(written) == list(source)  # same keys, same order
        rows = pq.read_table(out / f"{shard}.parquet").to_pylist()
        assert len(rows) == len(source) * (K + 1)
        for key, parts in written.items():
            assert parts["jpg"] == source[key]["jpg"]  # image bytes unchanged
            meta = json.loads(parts["json"])
            input_meta = json.loads(source[key]["json"])
            assert {k: meta[k] for k in input_meta} == input_meta
            cf = meta["capfilt"]
            assert cf["web_caption"] == source[key]["txt"].decode()
            assert [c["source"] for c in cf["candidates"]] == ["web"] + ["synthetic"] * K
            texts = [c["text"] for c in cf["candidates"]]
            assert len(cf["kept"]) == 2 and set(cf["kept"]) <= set(texts)
            assert parts["txt"].decode() == cf["kept"][0]
            kept_scores = [c["score"] for c in cf["candidates"] if c["text"] in cf["kept"]]
            other_scores = [c["score"] for c in cf["candidates"] if c["text"] not in cf["kept"]]
            assert min(kept_scores) >= max(other_scores, default=-1.0)
            mine = [r for r in rows if r["key"] == key]
            assert sorted(r["rank"] for r in mine) == list(range(K + 1))
            assert {r["caption"] for r in mine if r["kept"]} == set(cf["kept"])
            assert [r["score"] for r in mine] == [c["score"] for c in cf["candidates"]]
    assert (result.images, result.images_captioned, result.candidates) == (16, 16, 16 * K)
    assert (result.shards, result.shards_written, result.shards_reused, result.corrupt_shards) == (2, 2, 0, [])
    assert json.loads((out / "summary.json").read_text()) == result.model_dump(mode="json")


def test_summary_figures_match_the_checker(assets, first_run):
    result, out = first_run
    web_correct, kept_correct, web_kept = [], [], []
    for shard in ("00000", "00001"):
        for key, parts in read_tar(assets["shards"] / f"{shard}.tar").items():
            scene = Scene.from_json(json.loads(parts["json"])["scene"])
            web_correct.append(check_caption(parts["txt"].decode(), scene).correct)
            cf = json.loads(read_tar(out / f"{shard}.tar")[key]["json"])["capfilt"]
            kept_correct += [check_caption(text, scene).correct for text in cf["kept"]]
            web_kept.append(cf["web_caption"] in cf["kept"])
    assert result.web_precision == pytest.approx(sum(web_correct) / len(web_correct))
    assert result.kept_precision == pytest.approx(sum(kept_correct) / len(kept_correct))
    assert result.web_kept_share == pytest.approx(sum(web_kept) / len(web_kept))
    for value in (result.web_precision, result.synthetic_precision, result.kept_precision, result.web_kept_share):
        assert 0.0 <= value <= 1.0
    assert set(result.mean_scores) == {"web", "synthetic", "kept"}
    assert result.mean_scores["kept"] >= max(result.mean_scores["web"], result.mean_scores["synthetic"])
    assert result.captions_per_second > 0 and result.images_ranked_per_second > 0
    assert result.web_precision < 1.0  # the web split is noisy (40%)


def test_rerun_returns_the_record(assets, first_run):
    result, out = first_run
    again = run(config(assets), str(out))
    assert again.reused and again.model_dump(exclude={"reused"}) == result.model_dump(exclude={"reused"})


def test_deterministic_across_batch_sizes_and_runs(assets, first_run, capsys):
    _, out = first_run
    other = assets["root"] / "out-batch3"
    code = main(["--shards", str(assets["shards"]), "--captioner", str(assets["blip"]), "--ranker",
                 f"local-dir:{assets['clip']}", "--output", str(other), f"num_captions={K}", "max_new_tokens=12",
                 "min_new_tokens=2", "batch_size=3", "executor=local", "device=cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 16 and printed["output_uri"] == str(other)
    assert kept_by_key(other) == kept_by_key(out)
    for shard in ("00000", "00001"):
        a = pq.read_table(out / f"{shard}.parquet").to_pylist()
        b = pq.read_table(other / f"{shard}.parquet").to_pylist()
        assert [r["caption"] for r in a] == [r["caption"] for r in b]
        assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < 1e-5


def test_seed_changes_the_captions(assets, first_run):
    _, out = first_run
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    key = rows[0]["key"]
    image = Image.open(io.BytesIO(read_tar(assets["shards"] / "00000.tar")[key]["jpg"])).convert("RGB")
    seeded = [load_captioner(str(assets["blip"]), Sampling(K, 0.9, 12, 2, seed), "cpu").generate([image], [key])[0]
              for seed in (0, 1)]
    assert seeded[0] == [r["caption"] for r in rows if r["key"] == key and r["source"] == "synthetic"]
    assert seeded[1] != seeded[0]


# ---------------------------------------------------------------------------------- resume / damage
def test_resume_redoes_only_the_missing_shard(assets, first_run):
    _, done = first_run
    out = assets["root"] / "out-resume"
    shutil.copytree(done, out)
    (out / "00001.tar").unlink()
    (out / "_SUCCESS.json").unlink()
    before = (out / "00000.tar").stat().st_mtime_ns
    result = run(config(assets), str(out))
    assert (result.shards_reused, result.shards_written, result.images, result.images_captioned) == (1, 1, 16, 8)
    assert (out / "00000.tar").stat().st_mtime_ns == before
    assert kept_by_key(out) == kept_by_key(done)
    assert (out / "_SUCCESS.json").is_file()
    changed = run(config(assets, seed=1), str(out))  # another seed: nothing reusable
    assert (changed.shards_reused, changed.shards_written) == (0, 2)


def test_a_model_written_again_under_the_same_path_redoes_every_shard(assets):
    """The models are named by path: when the ranker's folder is written again (a retrained stand-in), neither the
    finished record nor a shard made with the old weights is reused."""
    from safetensors.torch import load_file, save_file

    ranker = assets["root"] / "clip-retrained"
    shutil.copytree(assets["clip"], ranker)
    cfg, out = config(assets, ranker=f"local-dir:{ranker}"), assets["root"] / "out-retrained"
    first = run(cfg, str(out))
    assert run(cfg, str(out)).reused  # nothing changed: the record holds
    weights = ranker / "open_clip_model.safetensors"
    save_file({name: value + 0.01 for name, value in load_file(weights).items()}, str(weights))
    again = run(cfg, str(out))
    assert not again.reused and (again.shards_reused, again.shards_written) == (0, first.shards_written) == (0, 2)
    (out / "_SUCCESS.json").unlink()
    assert run(cfg, str(out)).shards_reused == 2  # per shard: those made with the current weights are kept


def test_corrupt_shard_is_reported_and_skipped(assets, first_run):
    _, done = first_run
    shards = assets["root"] / "damaged"
    shutil.copytree(assets["shards"], shards)
    support.truncate(shards / "00000.tar")
    out = assets["root"] / "out-damaged"
    out.mkdir()
    for name in ("00000.tar", "00000.parquet"):  # an earlier run's output from the intact bytes: stale now
        shutil.copy(done / name, out / name)
    result = run(config(assets, shards=str(shards)), str(out))
    assert [c["shard"] for c in result.corrupt_shards] == ["00000"]
    assert "00000.tar" in result.corrupt_shards[0]["error"]
    assert not (out / "00000.tar").exists() and not (out / "00000.parquet").exists()
    assert (out / "00001.tar").is_file() and kept_by_key(out) == {k: v for k, v in kept_by_key(done).items()
                                                                   if k in read_tar(out / "00001.tar")}
    assert (result.shards_reused, result.shards_written, result.images) == (0, 1, 8)
    assert result.skipped_samples == result.skipped["in_corrupt_shard"] > 0
    assert result.warnings and (out / "_SUCCESS.json").is_file()


# -------------------------------------------------------------------------------------- validation
def test_validation_errors_name_the_field(assets, monkeypatch, tmp_path):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before validation failed")

    monkeypatch.setattr("pipelines.capfilt_models.load_captioner", no_models)
    monkeypatch.setattr("pipelines.capfilt_models.ClipRanker", no_models)
    cases = {"shards": dict(shards=str(tmp_path / "nothing-here")),
             "captioner": dict(captioner=str(tmp_path / "no-blip")),
             "captioner='stage2:": dict(captioner=f"stage2:{tmp_path / 'no-ckpt'}"),
             "ranker": dict(ranker=f"local-dir:{tmp_path / 'no-clip'}"),
             "ranker='ViT-Nope'": dict(ranker="ViT-Nope"),
             "ranker_weights": dict(ranker="ViT-B-32", ranker_weights=str(tmp_path / "none.pt")),
             "captioner_weight=0.5: needs the captioner's log-likelihoods": dict(
                 captioner=str(support.tiny_blip2(tmp_path / "blip2")), captioner_weight=0.5)}
    for field, fields in cases.items():
        with pytest.raises(ConfigError, match=field):
            run(config(assets, **fields), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="output"):
        run(config(assets), str(assets["shards"]))
    with pytest.raises(ConfigError, match="keep=5"):
        load_config(CapfiltConfig, None, ["keep=5", "num_captions=3"], shards="x", captioner="y", ranker="z")
    with pytest.raises(ConfigError, match="top_p"):
        load_config(CapfiltConfig, None, ["top_p=1.5"], shards="x", captioner="y", ranker="z")
    assert not (tmp_path / "out").exists()


def test_auto_executor_threshold(assets):
    assert capfilt.pick_executor(config(assets, executor="auto", ray_min_images=2000), 2000) == "local"
    assert capfilt.pick_executor(config(assets, executor="auto", ray_min_images=2000), 2001) == "ray"
    assert capfilt.count_images(str(assets["shards"] / "00000.tar")) == 8


# --------------------------------------------------------------------------------------- the filter
def test_rank_candidates_ties_duplicates_and_empty():
    # an empty caption is never kept, "A " repeats "a", and the web caption wins its tie with "b"
    ranked = rank_candidates("x", ["a", "A ", "b", ""], [0.5, 0.9, 0.9, 0.5, 1.0], keep=2)
    assert [(c.text, c.rank, c.kept) for c in ranked] == [
        ("x", 3, True), ("a", 1, True), ("A ", 2, False), ("b", 4, False), ("", 0, False)]
    only_web = rank_candidates("web", ["web", "web"], [0.1, 0.3, 0.2], keep=2)
    assert [c.kept for c in only_web] == [False, True, False]  # one distinct text: one kept


def test_rank_candidates_with_the_captioners_log_likelihood():
    scores, logliks = [0.50, 0.60, 0.55, 0.40], [-2.0, -0.5, -1.1]  # web, then three synthetic captions
    clip_only = rank_candidates("w", ["a", "b", "c"], scores, keep=2)
    assert [c.text for c in clip_only if c.kept] == ["a", "b"]
    assert all(c.loglik is None and c.rank_score == c.score for c in clip_only)
    mixed = rank_candidates("w", ["a", "b", "c"], scores, keep=2, logliks=logliks, captioner_weight=0.1)
    # rank scores: w 0.50 + 0.1 * mean(-1.2) = 0.38, a 0.40, b 0.50, c 0.29
    assert [round(c.rank_score, 6) for c in mixed] == [0.38, 0.4, 0.5, 0.29]
    assert [(c.text, c.rank, c.kept) for c in mixed] == [("w", 2, False), ("a", 1, True), ("b", 0, True),
                                                          ("c", 3, False)]
    assert [c.loglik for c in mixed] == [None, -2.0, -0.5, -1.1] and mixed[1].score == 0.60  # CLIP's score kept
    recorded = rank_candidates("w", ["a", "b", "c"], scores, keep=2, logliks=logliks)  # weight 0: CLIP ranks
    assert [c.kept for c in recorded] == [c.kept for c in clip_only] and recorded[1].loglik == -2.0
    with pytest.raises(ValueError, match="2 log-likelihoods for 3"):
        rank_candidates("w", ["a", "b", "c"], scores, keep=2, logliks=logliks[:2], captioner_weight=0.1)
    with pytest.raises(ValueError, match="needs the captioner's log-likelihoods"):
        rank_candidates("w", ["a", "b", "c"], scores, keep=2, captioner_weight=0.1)


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_captioner_log_likelihood_matches_step_by_step_decoding(assets, prompt):
    """The batched, teacher-forced mean log-probability of each caption's tokens (and [SEP]), the prompt left
    out, equals decoding the same tokens one step at a time, and does not depend on the other captions."""
    samples = read_tar(assets["shards"] / "00000.tar")
    images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in list(samples.values())[:2]]
    captioner = load_captioner(str(assets["blip"]), Sampling(num_captions=2, prompt=prompt), "cpu")
    captions = [["a red circle", "two big blue squares on the left"], ["a star", "a green cross"]]
    batched = captioner.log_likelihood(images, captions)
    assert [len(v) for v in batched] == [2, 2] and all(v < 0 for row in batched for v in row)
    assert captioner.log_likelihood(images[1:], [captions[1][1:]])[0][0] == pytest.approx(batched[1][1], abs=1e-5)

    model, tokenizer = captioner.model, captioner.processor.tokenizer
    pixels = captioner.processor(images=images[:1], return_tensors="pt")["pixel_values"]
    image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    prompt_ids = tokenizer(prompt)["input_ids"][1:-1] if prompt else []
    for caption, expected in zip(captions[0], batched[0]):
        target = tokenizer(caption)["input_ids"][1:]  # the caption's tokens and [SEP]
        ids = [model.config.text_config.bos_token_id, *prompt_ids]
        total = 0.0
        with torch.no_grad():
            for token in target:
                logits = model.text_decoder(input_ids=torch.tensor([ids]), encoder_hidden_states=image_embeds,
                                            return_dict=True).logits[0, -1]
                total += float(torch.log_softmax(logits, -1)[token])
                ids.append(token)
        assert total / len(target) == pytest.approx(expected, abs=1e-4)


def test_captioner_weight_ranks_with_the_log_likelihood_end_to_end(assets, first_run):
    out = assets["root"] / "out-weighted"
    result = run(config(assets, captioner_weight=0.2), str(out))
    assert result.images == 16 and result.config_hash != first_run[0].config_hash
    for shard in ("00000", "00001"):
        rows = pq.read_table(out / f"{shard}.parquet").to_pylist()
        metas = {k: json.loads(p["json"])["capfilt"] for k, p in read_tar(out / f"{shard}.tar").items()}
        for key, cf in metas.items():
            mine = [r for r in rows if r["key"] == key]
            assert mine[0]["loglik"] is None and all(r["loglik"] < 0 for r in mine[1:])
            assert [c.get("loglik") for c in cf["candidates"]] == [r["loglik"] for r in mine]
            again = rank_candidates(mine[0]["caption"], [r["caption"] for r in mine[1:]],
                                    [r["score"] for r in mine], 2, [r["loglik"] for r in mine[1:]], 0.2)
            assert [c.kept for c in again] == [r["kept"] for r in mine]
            assert [c.rank for c in again] == [r["rank"] for r in mine]


def test_keyed_nucleus_sampler_draws_from_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])  # top_p 0.9: tokens 1, 2 and 3 (the one crossing 0.9)
    uniforms = row_uniforms(0, [f"k{i}" for i in range(1000)], 4, 3)  # (4000, 3)
    sampler = KeyedNucleusSampler(uniforms, top_p=0.9, end_ids=[1], min_new_tokens=1)
    logits = probs.log().expand(len(uniforms), -1)
    first = sampler(None, logits).argmax(-1)  # step 0: the end token 1 is forbidden
    second = sampler(None, logits).argmax(-1)
    assert set(first.tolist()) == {2, 3}
    share = torch.bincount(second, minlength=4).double() / len(second)
    assert share[0] == 0 and torch.allclose(share[1:], probs[1:].double() / 0.95, atol=0.03)
    again = KeyedNucleusSampler(row_uniforms(0, ["k7"], 4, 3), top_p=0.9, end_ids=[1], min_new_tokens=1)
    assert again(None, logits[:4]).argmax(-1).tolist() == first[28:32].tolist()  # per row, not per batch


# ------------------------------------------------------------------------------------- captioners
@pytest.mark.parametrize("kind", ["blip", "blip2", "stage2"])
def test_captioner_kinds_generate_k_per_image(assets, kind):
    root = assets["root"]
    spec = {"blip": lambda: str(assets["blip"]), "blip2": lambda: str(support.tiny_blip2(root / "blip2")),
            "stage2": lambda: f"stage2:{support.tiny_stage2(root / 'stage2')}"}[kind]()
    samples = read_tar(assets["shards"] / "00000.tar")
    keys = list(samples)[:3]
    images = [Image.open(io.BytesIO(samples[k]["jpg"])).convert("RGB") for k in keys]
    captioner = load_captioner(spec, Sampling(num_captions=4, max_new_tokens=8, min_new_tokens=2), "cpu")
    captions = captioner.generate(images, keys)
    assert len(captions) == 3 and all(len(c) == 4 for c in captions)
    assert all(isinstance(t, str) and t for c in captions for t in c)
    assert len({t for c in captions for t in c}) > 4  # sampled, not one caption repeated
    assert captioner.generate(images[1:2], keys[1:2]) == captions[1:2]  # independent of the batch


def test_ranker_in_fp16_scores_as_in_fp32(assets):
    """open_clip's "fp16" (what a GPU gets) casts only the matmul weights; the image must go in as the patch
    embedding's weights are, not as the model's first parameter (fp32): this failed on the GPU in session 20."""
    samples = read_tar(assets["shards"] / "00000.tar")
    images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in list(samples.values())[:3]]
    captions = [[s["txt"].decode(), "a red circle", "spam spam"] for s in list(samples.values())[:3]]
    full = ClipRanker(f"local-dir:{assets['clip']}", None, "cpu")
    half = ClipRanker(f"local-dir:{assets['clip']}", None, "cpu", precision="fp16")
    assert (full.pixel_dtype, half.pixel_dtype) == (torch.float32, torch.float16)
    a, b = torch.tensor(full.score(images, captions)), torch.tensor(half.score(images, captions))
    assert a.shape == (3, 3) and torch.allclose(a, b, atol=5e-3)


def test_oracle_precision_and_ranker_accuracy_by_hand():
    import pyarrow as pa

    from pipelines.capfilt import ScoreStats

    rows = [  # key, caption, source, score, kept, correct
        ("a", "web a", "web", 0.9, True, False),
        ("a", "x", "synthetic", 0.8, True, True),
        ("a", "x", "synthetic", 0.7, False, True),  # a duplicate: one distinct correct caption for image a
        ("a", "y", "synthetic", 0.8, False, False),
        ("b", "web b", "web", 0.5, False, True),
        ("b", "p", "synthetic", 0.6, True, True),
        ("b", "q", "synthetic", 0.7, True, False),
        ("c", "web c", "web", 0.1, True, None),  # not a shapes-world image: left out of both figures
        ("c", "r", "synthetic", 0.2, True, None),
    ]
    table = pa.table({name: [r[i] for r in rows] for i, name in
                      enumerate(("key", "caption", "source", "score", "kept", "correct"))})
    stats = ScoreStats()
    stats.add(table)
    figures = stats.figures()
    # a: min(1 distinct correct, 2 kept) = 1; b: min(2, 2) = 2 -> 3 of 4 kept
    assert figures["oracle_kept_precision"] == pytest.approx(3 / 4)
    # a: correct {0.8, 0.7} vs wrong {0.9, 0.8}: 0.8>0.9 no, 0.8=0.8 half, 0.7 no, no -> 0.5 of 4
    # b: correct {0.5, 0.6} vs wrong {0.7}: 0 of 2
    assert figures["ranker_pair_accuracy"] == pytest.approx(0.5 / 6, abs=1e-6)
    assert figures["kept_precision"] == pytest.approx(2 / 4)  # kept and judged: a web(F), a x(T), b p(T), b q(F)
