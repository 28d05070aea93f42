"""Claim: our download step costs under 10% over the plain `img2dataset` command on the same URL list.

Both run as fresh processes against the same local image server (no faults), same URL list and the
same img2dataset settings; the runs alternate (plain, ours, plain, ours, ...) and the medians are
compared. Ours adds input validation, presets, the summary from the stats files and `_SUCCESS.json`.

    .venv/bin/python benchmarks/bench_download.py [--images 1500] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_cmd, write_result  # noqa: E402

from pipelines.serve import ImageServer  # noqa: E402
from pipelines.shapes import synth  # noqa: E402

SETTINGS = {"image_size": 96, "processes_count": 2, "thread_count": 16, "number_sample_per_shard": 500,
            "timeout": 10, "retries": 0, "encode_quality": 95, "resize_mode": "border"}


def plain_command(url_list: Path, out: Path) -> list[str]:
    bin_dir = Path(sys.executable).parent
    return [str(bin_dir / "img2dataset"), f"--url_list={url_list}", f"--output_folder={out}",
            "--input_format=parquet", "--url_col=url", "--caption_col=caption", "--output_format=webdataset",
            f"--image_size={SETTINGS['image_size']}", f"--processes_count={SETTINGS['processes_count']}",
            f"--thread_count={SETTINGS['thread_count']}",
            f"--number_sample_per_shard={SETTINGS['number_sample_per_shard']}",
            f"--timeout={SETTINGS['timeout']}", f"--retries={SETTINGS['retries']}",
            f"--encode_quality={SETTINGS['encode_quality']}", f"--resize_mode={SETTINGS['resize_mode']}",
            "--save_additional_columns=['scene','captions','questions','noise']",
            "--enable_wandb=False"]


def our_command(url_list: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.download", "--url-list", str(url_list), "--output", str(out),
            *[f"{k}={v}" for k, v in SETTINGS.items()]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = {"NO_ALBUMENTATIONS_UPDATE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        with ImageServer(tmp / "data", port=0) as server:
            synth.run(synth.SynthConfig(split="curated", images=args.images, seed=0, base_url=server.url),
                      str(tmp / "data"), progress=False)
            url_list = tmp / "data" / "curated.parquet"
            plain, ours = [], []
            for i in range(args.repeats):
                for times, make in ((plain, plain_command), (ours, our_command)):
                    out = tmp / f"out-{make.__name__}-{i}"
                    times.append(run_cmd(make(url_list, out), env))
                    got = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
                    assert got == args.images, f"{make.__name__}: {got} of {args.images} images downloaded"
                    shutil.rmtree(out)
    plain_s, ours_s = statistics.median(plain), statistics.median(ours)
    write_result(
        "download", baseline={"what": "plain img2dataset command", "seconds": round(plain_s, 2),
                              "images_per_s": round(args.images / plain_s, 1), "runs": plain},
        candidate={"what": "python -m pipelines.download", "seconds": round(ours_s, 2),
                   "images_per_s": round(args.images / ours_s, 1), "runs": ours},
        ratio=ours_s / plain_s, units="wall-time ratio, ours / plain (1.0 = no overhead)",
        goal="ratio < 1.10", extra={"images": args.images, "settings": SETTINGS})


if __name__ == "__main__":
    main()
