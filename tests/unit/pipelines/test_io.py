"""`io.files_fingerprint`: the version stamp that tells a step its input files changed under the same names."""
import os

import fsspec

from pipelines import io


def test_a_rewritten_touched_added_or_removed_file_changes_the_stamp(tmp_path):
    for name in ("0.tar", "1.tar"):
        (tmp_path / name).write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("y")
    uris = [str(tmp_path / "0.tar"), str(tmp_path / "1.tar"), str(tmp_path / "model")]
    stamps = [io.files_fingerprint(uris)]
    assert io.files_fingerprint(uris) == stamps[0]  # nothing changed: the same stamp
    (tmp_path / "model" / "weights").write_text("z")  # a folder's file rewritten (a retrained model)
    stamps.append(io.files_fingerprint(uris))
    os.utime(tmp_path / "1.tar", ns=(1, 1))  # the same bytes, another time
    stamps.append(io.files_fingerprint(uris))
    (tmp_path / "model" / "extra").write_text("")  # a file added to a folder
    stamps.append(io.files_fingerprint(uris))
    assert len(set(stamps)) == 4
    assert io.files_fingerprint(uris[:2]) != io.files_fingerprint(uris[1:])  # which files, not only their state


def test_object_store_files_and_folders_are_stamped_too():
    memory = fsspec.filesystem("memory")
    memory.pipe("/stamp/a.tar", b"1")
    memory.pipe("/stamp/model/w", b"2")
    uris = ["memory://stamp/a.tar", "memory://stamp/model"]
    before = io.files_fingerprint(uris)
    assert io.files_fingerprint(uris) == before
    memory.pipe("/stamp/model/w", b"22")
    assert io.files_fingerprint(uris) != before
    memory.rm("/stamp", recursive=True)
