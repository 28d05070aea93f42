"""Shards rewritten in key order: samples grouped and ascending, bytes unchanged, atomic, idempotent."""
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.key_order import in_key_order, member_key, order_parquet, order_shards, order_tar


def write_tar(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            data = f"bytes of {name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_tar(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_member_key_stops_at_the_first_dot():
    assert member_key("000000003.jpg") == "000000003"
    assert member_key("000000003.meta.json") == "000000003"
    assert member_key("sub/000000003.txt") == "sub/000000003"


def test_a_shard_in_completion_order_is_rewritten_in_key_order(tmp_path):
    shard = tmp_path / "00000.tar"
    names = [f"00000000{k}.{ext}" for k in (3, 1, 4, 0) for ext in ("jpg", "txt", "json")]
    write_tar(shard, names)
    before = dict(read_tar(shard))
    assert not in_key_order(tarfile.open(shard).getmembers())
    assert order_tar(str(shard)) is True
    after = read_tar(shard)
    assert [n for n, _ in after] == [f"00000000{k}.{ext}" for k in (0, 1, 3, 4) for ext in ("jpg", "txt", "json")]
    assert dict(after) == before  # every member's bytes unchanged
    assert order_tar(str(shard)) is False  # already in order: left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]  # no temporary left behind


def test_interleaved_keys_are_grouped():
    members = [tarfile.TarInfo(n) for n in ("1.jpg", "2.jpg", "1.txt", "2.txt")]
    assert not in_key_order(members)
    assert in_key_order([tarfile.TarInfo(n) for n in ("1.jpg", "1.txt", "2.jpg", "2.txt")])


def test_parquet_rows_are_sorted_by_key(tmp_path):
    path = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"key": ["002", "000", "001"], "status": ["success", "failed", "success"]}), path)
    assert order_parquet(str(path)) is True
    table = pq.read_table(path)
    assert table.column("key").to_pylist() == ["000", "001", "002"]
    assert table.column("status").to_pylist() == ["failed", "success", "success"]
    assert order_parquet(str(path)) is False


def test_order_shards_counts_what_it_rewrote(tmp_path):
    write_tar(tmp_path / "00000.tar", ["1.jpg", "0.jpg"])
    write_tar(tmp_path / "00001.tar", ["2.jpg", "3.jpg"])
    pq.write_table(pa.table({"key": ["2", "3"]}), tmp_path / "00001.parquet")
    assert order_shards([str(tmp_path / "00000"), str(tmp_path / "00001")]) == 1
    assert [n for n, _ in read_tar(tmp_path / "00000.tar")] == ["0.jpg", "1.jpg"]
