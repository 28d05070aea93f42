"""Download step pieces that need no server and no img2dataset run: config, presets, url lists, reasons."""
import pandas as pd
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.download import (PRESETS, DownloadConfig, ReservedColumn, UnsupportedFormat, infer_format,
                                read_url_list, reason_class, resolve)


def frame(n: int, url: str = "url", caption: str = "caption", **extra) -> pd.DataFrame:
    data = {url: [f"http://127.0.0.1:1/{i}.jpg" for i in range(n)], caption: [f"c{i}" for i in range(n)]}
    data.update({k: [v] * n for k, v in extra.items()})
    return pd.DataFrame(data)


def test_config_rejects_typos_and_wandb(tmp_path):
    with pytest.raises(ConfigError, match="retrys"):
        load_config(DownloadConfig, None, ["retrys=3"], url_list="x.parquet")
    with pytest.raises(ConfigError, match="enable_wandb"):
        load_config(DownloadConfig, None, ["enable_wandb=true"], url_list="x.parquet")
    cfg = load_config(DownloadConfig, None, ["timeout=2", "distributor=ray"], url_list="x.parquet")
    assert (cfg.timeout, cfg.distributor, cfg.retries, cfg.processes_count) == (2.0, "ray", 2, 2)


@pytest.mark.parametrize("name,fmt", [("a.parquet", "parquet"), ("a.csv", "csv"), ("a.TSV", "tsv"),
                                      ("s3://b/a.jsonl", "jsonl"), ("a.json", "json"), ("a.txt", "txt"),
                                      ("a.tsv.gz", "tsv.gz"), ("a.xlsx", None), ("noext", None)])
def test_infer_format(name, fmt):
    assert infer_format(name) == fmt


def test_custom_preset_keeps_other_columns_and_resolution_is_stable(tmp_path):
    path = tmp_path / "urls.parquet"
    frame(5, key="k", scene="s", status="x").to_parquet(path)
    cfg, urls = resolve(DownloadConfig(url_list=str(path)))
    assert (cfg.input_format, cfg.url_col, cfg.caption_col, cfg.image_size, cfg.resize_mode) == \
        ("parquet", "url", "caption", 224, "border")
    assert cfg.additional_columns == ["scene"] and urls.rows == 5
    assert len(urls.notes) == 2 and "'key'" in urls.notes[0] and "'status'" in urls.notes[1]
    again, _ = resolve(cfg)
    assert again == cfg and again.config_hash() == cfg.config_hash()


def test_laion_preset(tmp_path):
    path = tmp_path / "part-0.parquet"
    frame(3, url="URL", caption="TEXT", NSFW="UNLIKELY", similarity=0.3, LICENSE="?", extra=1).to_parquet(path)
    cfg, _ = resolve(DownloadConfig(url_list=str(path), preset="laion400m"))
    assert (cfg.url_col, cfg.caption_col, cfg.additional_columns, cfg.image_size) == \
        ("URL", "TEXT", ["NSFW", "similarity", "LICENSE"], PRESETS["laion400m"].image_size)


def test_explicit_reserved_column_is_an_error(tmp_path):
    path = tmp_path / "urls.csv"
    frame(2, key="k").to_csv(path, index=False)
    with pytest.raises(ReservedColumn, match=r"urls.csv: field additional_columns: \['key'\]"):
        resolve(DownloadConfig(url_list=str(path), additional_columns=["key"]))


def test_txt_list_has_no_caption(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://127.0.0.1:1/a.jpg\nhttp://127.0.0.1:1/b.jpg\n")
    cfg, urls = resolve(DownloadConfig(url_list=str(path)))
    assert (cfg.url_col, cfg.caption_col, cfg.additional_columns, urls.rows) == ("url", "", [], 2)


def test_folder_of_parquet_files(tmp_path):
    folder = tmp_path / "laion"
    folder.mkdir()
    frame(25, scene="a").to_parquet(folder / "part-0.parquet")
    frame(7, scene="b", only_here=1).to_parquet(folder / "part-1.parquet")
    (folder / "README.md").write_text("not a url list")
    urls = read_url_list(str(folder))
    assert (urls.input_format, urls.rows_per_file, urls.columns) == ("parquet", [25, 7], ["url", "caption", "scene"])
    assert urls.expected_shards(10) == 3 + 1  # img2dataset shards each file on its own
    (folder / "part-2.csv").write_text("url\nhttp://x/1.jpg\n")
    with pytest.raises(UnsupportedFormat, match="field input_format"):
        read_url_list(str(folder))
    assert read_url_list(str(folder), "csv").rows == 1


def test_reason_classes():
    assert reason_class("HTTP Error 404: Not Found") == "http_404"
    assert reason_class("HTTP Error 429: Too Many Requests") == "http_429"
    assert reason_class("timed out") == reason_class("The read operation timed out") == "timeout"
    assert reason_class("Image decoding error") == "decode_error"
    assert reason_class("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert reason_class("image too small") == "filtered_size"
    assert reason_class("something new") == "other: something new"
