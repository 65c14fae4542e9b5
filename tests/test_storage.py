"""A run's files through dopsd_ray/storage.py: the same calls on a local folder and on an
object store (moto's S3 server on loopback, a process of its own), and no other module of the
package writing a run's files behind its back."""

import ast
import json
from pathlib import Path

import pytest
import torch

from dopsd_ray.checkpoint import (
    CheckpointUnreadable, check_checkpoint, checkpoint_dir_name, latest_checkpoint, load_checkpoint,
    upload_checkpoint, usable_checkpoint, write_checkpoint_files,
)
from dopsd_ray.storage import Storage, local_copy
from dopsd_ray.weights import FullWeights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh storage root: a local folder, or a prefix in the S3 server's bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").uri(f"{request.node.originalname}/{tmp_path.name}")


def test_files_are_written_read_listed_copied_and_removed_alike_on_a_folder_and_an_object_store(root, tmp_path):
    store = Storage(root)
    assert not store.exists() and store.listdir() == [] and store.listdir("nothing") == []
    store.write("a/config.yaml", "x: 1\n")
    store.write("a/blob.bin", bytes(range(256)) * 4096)
    assert store.read_text("a/config.yaml") == "x: 1\n" and store.size("a/blob.bin") == 1 << 20
    assert store.is_file("a/config.yaml") and not store.is_file("a") and store.exists("a")
    assert store.listdir() == ["a"] and store.listdir("a") == ["blob.bin", "config.yaml"]
    assert store.name_uri("a", "blob.bin") == f"{store.uri}/a/blob.bin"

    # a folder: nested files, the ones named `last` after the others, partial files left behind
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w.safetensors").write_bytes(b"w" * 100)
    (src / "model_index.json").write_text("{}")
    (src / ".x.safetensors.123.partial").write_bytes(b"half")
    store.put_dir(src, "model", last=("model_index.json",))
    assert store.listdir("model") == ["model_index.json", "unet"]
    copy = store.fetch_dir("model", tmp_path / "copy")
    assert (copy / "unet" / "w.safetensors").read_bytes() == b"w" * 100
    assert sorted(p.name for p in copy.rglob("*") if p.is_file()) == ["model_index.json", "w.safetensors"]
    assert (copy == Path(store.path("model"))) == store.local  # local: the folder itself, no copy

    # made by a writer into a local file (an image's save(), save_file), stored whole
    store.write_with("samples/grid.png", lambda p: p.write_bytes(b"\x89PNG"))
    assert store.read_bytes("samples/grid.png") == b"\x89PNG"
    if store.local:  # nothing partial is left beside it
        assert sorted(p.name for p in Path(store.path("samples")).iterdir()) == ["grid.png"]

    # a node-local copy of a stored folder (a model the driver put there): once per node
    local = Path(local_copy(store.name_uri("model")))
    assert (local / "unet" / "w.safetensors").read_bytes() == b"w" * 100
    assert (local == Path(store.path("model"))) == store.local

    # replaced files get a new copy (named by the listing); recursive=False leaves subfolders out
    store.write("model/unet/w.safetensors", b"v" * 120)
    fresh = Path(local_copy(store.name_uri("model")))
    assert (fresh / "unet" / "w.safetensors").read_bytes() == b"v" * 120
    top = Path(local_copy(store.name_uri("model"), recursive=False))
    assert store.local or sorted(p.name for p in top.rglob("*") if p.is_file()) == [".complete", "model_index.json"]

    # an upload that fails half way leaves no object behind (closing an S3 stream would complete it)
    if not store.local:
        def half(stream):
            stream.write(b"half")
            raise RuntimeError("the source went away")
        with pytest.raises(RuntimeError):
            store._upload("broken.bin", half)
        assert not store.exists("broken.bin")

    store.remove("model")
    store.remove("a/config.yaml")
    store.remove("never-written")
    assert store.listdir() == ["a", "samples"] and store.listdir("a") == ["blob.bin"]


def small_checkpoint(directory, step, value):
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(value)
    state = dict(model.state_dict())
    return write_checkpoint_files(directory, 0, 1, step, {"skipped_nonfinite": 0},
                                  torch.optim.AdamW(model.parameters()), state, state)


def test_checkpoints_are_checked_by_their_headers_and_resumed_from_wherever_they_are_stored(root, tmp_path):
    """Complete, incomplete and truncated checkpoints told apart by reading headers only; the
    newest complete one found by a scan; a registered one that cannot be read fails naming it."""
    from ray.train import Checkpoint

    experiment = Storage(root).child("ray_train", "run")
    good = upload_checkpoint(small_checkpoint(tmp_path / "l2", 2, 0.5), experiment, checkpoint_dir_name(2))
    assert check_checkpoint(good) is None and latest_checkpoint(experiment).uri == good

    # step 4: every file but state.json (the writer died before the last one)
    local4 = small_checkpoint(tmp_path / "l4", 4, 1.0)
    (local4 / "state.json").unlink()
    upload_checkpoint(local4, experiment, checkpoint_dir_name(4))
    assert "no state.json" in check_checkpoint(experiment.child(checkpoint_dir_name(4)))
    # step 6: complete, then its teacher truncated (a damaged object or file)
    six = experiment.child(checkpoint_dir_name(6))
    upload_checkpoint(small_checkpoint(tmp_path / "l6", 6, 2.0), experiment, checkpoint_dir_name(6))
    teacher = six.read_bytes("teacher.safetensors")
    six.write("teacher.safetensors", teacher[:-3])
    assert "damaged" in check_checkpoint(six)
    assert latest_checkpoint(experiment).uri == good

    # Ray Train registered step 6: it must be readable; the run fails naming it
    with pytest.raises(CheckpointUnreadable, match=f"cannot resume.*{checkpoint_dir_name(6)}.*teacher"):
        usable_checkpoint(Checkpoint(six.path(), filesystem=six.fs), experiment)
    six.write("teacher.safetensors", teacher)
    resume = usable_checkpoint(Checkpoint(six.path(), filesystem=six.fs), experiment)
    weights = FullWeights(torch.nn.Linear(4, 4))
    state = load_checkpoint(resume, weights, 0, 1)
    assert state.step == 6 and torch.all(weights.model.weight == 2.0) and state.optimizer_tensors
    assert json.loads(six.read_text("state.json"))["step"] == 6


# -- one module writes a run's files --------------------------------------------------------
METHOD_WRITES = {"write_text", "write_bytes", "mkdir", "unlink", "rmdir", "rename", "touch", "symlink_to", "save",
                 "save_pretrained", "to_parquet", "write_parquet", "remove", "put_file", "put_dir", "write"}
MODULE_WRITES = {"os": {"replace", "rename", "remove", "unlink", "makedirs", "mkdir", "rmdir"},
                 "shutil": {"copyfile", "copy", "copy2", "copytree", "move", "rmtree"},
                 "pq": {"write_table"}}
NAME_WRITES = {"save_file", "write_table", "rmtree", "copyfile", "copytree"}
STORAGE_CALLS = {"write_with", "write_atomic"}  # a writer given to these makes a local file they store
STORAGE_OBJECTS = ("store", "root", "run", "experiment", "ctx", "storage", "Storage(")  # a Storage's own methods
# node-local scratch (never a run's file), each for a reason:
SCRATCH = {
    "dopsd_ray/storage.py": "the storage module itself",
    "dopsd_ray/checkpoint.py:write_checkpoint_files": "a rank's files into its own temp dir, then stored",
    "dopsd_ray/weights.py": "an export into the temp dir the caller stores (learner/reporter.py)",
    "dopsd_ray/families/": "a tiny model built into a new local folder (then stored, families.base_model_path)",
    "dopsd_ray/toy/": "the miniature's bundled base and concept data (jobs/build_toy_base.py), not a run",
    "dopsd_ray/data/bundled.py": "the bundled sample images, written once into the repository",
    "dopsd_ray/tracking_server.py:__init__": "the MLflow server process's log, beside its store on the driver's disk",
}


def _call_writes(node: ast.Call) -> str | None:
    """The name of the file-writing call `node` is, or None."""
    func = node.func
    if isinstance(func, ast.Name):
        if func.id == "open":
            modes = node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
            return "open" if any(isinstance(m, ast.Constant) and set(str(m.value)) & set("wax+") for m in modes) else None
        return func.id if func.id in NAME_WRITES else None
    if not isinstance(func, ast.Attribute):
        return None
    owner = ast.unparse(func.value)
    if func.attr == "write_table" and len(node.args) > 1 and "buffer" in ast.unparse(node.args[1]):
        return None  # into memory (then stored)
    if owner in MODULE_WRITES:
        return func.attr if func.attr in MODULE_WRITES[owner] else None
    if func.attr in METHOD_WRITES and not any(word in owner for word in STORAGE_OBJECTS):
        return func.attr
    return None


def _writes(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, call, enclosing function) of every file-writing call not inside a writer handed to storage."""
    found = []

    def visit(node, function, handed):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in STORAGE_CALLS:
                handed = True
            elif not handed and (call := _call_writes(node)):
                found.append((node.lineno, call, function))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        for child in ast.iter_child_nodes(node):
            visit(child, function, handed)

    visit(tree, "", False)
    return found


def test_no_module_outside_storage_writes_a_runs_files():
    """Every write, copy, rename and removal in the package goes through storage.Storage, except
    the node-local scratch listed in SCRATCH with its reason."""
    offenders = []
    for path in sorted((ROOT / "dopsd_ray").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, call, function in _writes(ast.parse(path.read_text())):
            where = f"{rel}:{function}"
            if not any(where.startswith(k) or rel.startswith(k) for k in SCRATCH):
                offenders.append(f"{rel}:{line} {call}() in {function or 'module'}")
    assert not offenders, "file writes outside dopsd_ray/storage.py:\n" + "\n".join(offenders)


def test_the_walker_finds_writes():
    """The check above can fail: the walker sees a write, and not one handed to storage."""
    code = ("def f(p, store, d):\n    p.write_text('x')\n    store.write_with('n', lambda t: t.write_text('x'))\n"
            "    open(p, 'wb')\n    store.remove('n')\n    shutil.rmtree(p)\n    d.copy(); 'a'.replace('a', 'b')\n"
            "    os.replace(p, p)\n    image.save(p)\n    open(p)\n")
    assert [(line, call) for line, call, _ in _writes(ast.parse(code))] == [
        (2, "write_text"), (4, "open"), (6, "rmtree"), (8, "replace"), (9, "save")]


def test_data_on_an_object_store_shards_written_there_and_a_folder_read_from_it(s3, local_ray):
    """jobs/prepare_data.py's writer puts shards into the bucket; training streams them from there;
    a folder of images + captions in the bucket is read as a local one is (copied to the driver)."""
    from dopsd_ray.data.shards import list_sources, write_shards
    from dopsd_ray.data.stream import StreamSpec, bundled_dataset_path, read_shards

    folder = bundled_dataset_path()
    shards = Storage(s3.uri("data/shards"))
    summary = write_shards(list_sources(folder), shards.uri, rows_per_shard=4)
    assert summary.rows_written == len(list_sources(folder)) and len(summary.shards) > 1
    assert shards.listdir() == sorted([Path(p).name for p in summary.shards] + ["summary.json"])
    with pytest.raises(FileExistsError, match="already holds"):
        write_shards(list_sources(folder), shards.uri)
    Storage(s3.uri("data")).put_dir(folder, "folder")
    spec = StreamSpec(pixel_budget=64 * 64, shuffle_files=False)
    for uri in (shards.uri, s3.uri("data/folder")):
        dataset, stats = read_shards(uri, spec)
        ids = sorted(row["id"] for row in dataset.iter_rows())
        assert len(ids) == summary.rows_written, uri
