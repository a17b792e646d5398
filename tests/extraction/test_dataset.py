"""Discovery: layouts, manifests, label maps, and a one-line error for every malformed input."""

from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.extraction.dataset import FLAT_SPLIT, discover


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_split_layout_finds_splits_classes_and_relative_paths(tmp_path):
    for p in ["train/b/1.JPG", "train/a/2.png", "train/a/sub/3.jpeg", "val/a/4.webp", "train/a/notes.txt", "train/a/.hidden.jpg"]:
        touch(tmp_path / p)
    ds = discover(tmp_path)
    assert ds.class_names == ("a", "b")
    assert ds.splits == ["train", "val"]
    assert [(i.split, i.path, i.label) for i in ds.items] == [
        ("train", "train/a/2.png", "a"), ("train", "train/a/sub/3.jpeg", "a"), ("train", "train/b/1.JPG", "b"),
        ("val", "val/a/4.webp", "a")]


def test_flat_layout_is_split_all(tmp_path):
    touch(tmp_path / "cats" / "1.jpg")
    touch(tmp_path / "dogs" / "1.gif")
    ds = discover(tmp_path)
    assert ds.splits == [FLAT_SPLIT] and ds.class_names == ("cats", "dogs")
    assert [i.path for i in ds.items] == ["cats/1.jpg", "dogs/1.gif"]


def test_manifest_with_header_and_splits(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split\nimg/1.jpg,cat,train\nimg/2.jpg,dog,train\nimg/3.jpg,cat,test\n")
    ds = discover(tmp_path / "m.csv")
    assert (ds.kind, ds.root, ds.name) == ("csv", tmp_path, "m")
    assert ds.class_names == ("cat", "dog")
    assert [(i.split, i.path) for i in ds.items] == [("test", "img/3.jpg"), ("train", "img/1.jpg"), ("train", "img/2.jpg")]


def test_manifest_without_header_is_split_all(tmp_path):
    (tmp_path / "m.csv").write_text("a.jpg,x\nb.jpg,y\n")
    assert {i.split for i in discover(tmp_path / "m.csv").items} == {FLAT_SPLIT}


@pytest.mark.parametrize("text, message", [
    ("path,label\na.jpg\n", "line 2: expected 'path,label[,split]'"),
    ("a.jpg,x,train,extra\n", "line 1: expected"),
    ("a.jpg,,train\n", "line 1: expected"),
    ("/abs/a.jpg,x\n", "must be relative"),
    ("a.jpg,x\na.jpg,y\n", "a.jpg is already listed on line 1"),
    ("path,label\n", "lists no images"),
    ("a.jpg,x,train\nb.jpg,z,val\n", "class 'z' in split 'val' is not a class of 'train'"),
    ("a.jpg,x,train\nb.jpg,x,.\n", "line 2: split '.' is not a name"),
    ("a.jpg,x,train\nb.jpg,x,..\n", "line 2: split '..' is not a name"),
    ("a.jpg,x,a/b\n", "line 1: split 'a/b' contains '/'"),
    ("a.jpg,x,../x\n", "line 1: split '../x' contains '/'"),
    ("a.jpg,x,tr\x07ain\n", "contains a control character"),
], ids=["short-row", "long-row", "empty-label", "absolute", "repeated", "header-only", "unknown-class", "split-dot",
        "split-dotdot", "split-slash", "split-parent", "split-control"])
def test_malformed_manifest_is_a_user_error(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        discover(tmp_path / "m.csv")


def test_unknown_class_in_val_is_named(tmp_path):
    touch(tmp_path / "train" / "a" / "1.jpg")
    touch(tmp_path / "val" / "zebra" / "1.jpg")
    with pytest.raises(UserError, match="class 'zebra' in split 'val' is not a class of 'train'"):
        discover(tmp_path)


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data path not found"):
        discover(tmp_path / "missing")
    with pytest.raises(UserError, match="no class folders"):
        discover(tmp_path)
    touch(tmp_path / "loose.jpg")
    with pytest.raises(UserError, match="no class folders"):
        discover(tmp_path)
    with pytest.raises(UserError, match="not a .csv manifest"):
        discover(tmp_path / "loose.jpg")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        discover(tmp_path)


def test_directory_links_back_into_the_tree_are_followed_once(tmp_path, caplog):
    touch(tmp_path / "train" / "a" / "1.jpg")
    touch(tmp_path / "train" / "b" / "2.jpg")
    (tmp_path / "train" / "a" / "up").symlink_to("..")  # a loop, through which class b is also reachable
    (tmp_path / "train" / "a" / "sister").symlink_to("../b")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-outside"
    touch(elsewhere / "3.jpg")
    (tmp_path / "train" / "b" / "linked").symlink_to(elsewhere)  # a link out of the tree is followed
    with caplog.at_level("WARNING"):
        ds = discover(tmp_path)
    assert [(i.path, i.label) for i in ds.items] == [("train/a/1.jpg", "a"), ("train/b/2.jpg", "b"),
                                                    ("train/b/linked/3.jpg", "b")]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["skipped 2 directory links that lead back into folders already scanned (a loop, or another "
                        "class): train/a/sister, train/a/up"]


def test_a_manifest_that_is_not_utf8_is_a_user_error(tmp_path):
    (tmp_path / "m.csv").write_bytes("path,label\ncafé.jpg,x\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"manifest .*m\.csv is not UTF-8 text \(byte 0xe9 at offset 14\)"):
        discover(tmp_path / "m.csv")


def test_a_nul_byte_in_a_manifest_is_a_user_error(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"path,label\ntrain/a\x00b.jpg,x\n")
    with pytest.raises(UserError, match=r"line 2: a NUL byte in 'train/a\\x00b.jpg'"):
        discover(tmp_path / "m.csv")


def test_a_folder_that_cannot_be_listed_is_refused_not_skipped(tmp_path, monkeypatch):
    import os

    touch(tmp_path / "train" / "a" / "1.jpg")
    touch(tmp_path / "train" / "b" / "sub" / "2.jpg")
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 as a non-root user would see it (root reads any folder)
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=r"cannot list .*train/b/sub \(Permission denied\); fix its permissions"):
        discover(tmp_path)
