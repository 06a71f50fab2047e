"""`motionsep download` against a real HTTP server on 127.0.0.1 in the hub's URL layout.

Nothing here mocks huggingface_hub: the tests start a ``ThreadingHTTPServer``
that answers the endpoints huggingface_hub calls (revision, tree, HEAD/GET
resolve with Range) and point the library at it with ``endpoint=`` or
``HF_ENDPOINT``.

Offline mode: tests/conftest.py sets ``HF_HUB_OFFLINE=1`` before
huggingface_hub is imported, so ``constants.HF_HUB_OFFLINE`` is True. The
client checks ``constants.is_offline_mode()`` (which reads that module
attribute) on every request, so the ``hub`` fixture sets the attribute to
False for one test with monkeypatch, which restores it afterwards. Requests
can only reach the loopback server the test started.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from motionsep.errors import (
    DamagedModelError,
    DiskFullError,
    HubAccessError,
    HubFileMissingError,
    HubRepoNotFoundError,
    HubUnreachableError,
    ModelFormatError,
)
from motionsep.hub import download, import_folder, plan_files
from motionsep.model.components import load_components
from motionsep.store import MODEL_RECORD, Store
from motionsep_cli.app import app
from tests._hub_server import FakeHub, Repo, running_hub
from tests._hub_server import folder_files as _folder_files
from tests._hub_server import store_entries as _store_entries

runner = CliRunner()

REPO = "acme/tiny-t2v"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


# -- a hub on loopback (tests/_hub_server.py) -------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running loopback hub; huggingface_hub may talk to it for this test only."""
    with running_hub(monkeypatch) as server:
        yield server


@pytest.fixture
def tiny_repo(hub: FakeHub, tiny_model_dir: Path) -> Repo:
    """The tiny model as a hub repo, with files a download must leave alone."""
    files = _folder_files(tiny_model_dir)
    files["README.md"] = b"# tiny\n"
    files[".gitattributes"] = b"*.safetensors filter=lfs\n"
    files["zs2_576w/text2video_pytorch_model.pth"] = b"webui checkpoint, not for diffusers"
    files["unet/diffusion_pytorch_model.fp16.safetensors"] = b"not fetched without --variant"
    repo = Repo(files)
    hub.repos[REPO] = repo
    return repo


# -- file selection (no server) ---------------------------------------------------------

ZEROSCOPE_MAIN = [  # cerspense/zeroscope_v2_576w at main: pickles only, plus webui files
    ".gitattributes",
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "zs2_576w/open_clip_pytorch_model.bin",
    "zs2_576w/text2video_pytorch_model.pth",
]
# ali-vilab/text-to-video-ms-1.7b: .bin and safetensors, each also as fp16
MODELSCOPE_MAIN = (
    [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
    ]
    + [
        f"{part}/{stem}{variant}.{ext}"
        for part, stem in (
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
            ("text_encoder", "model"),
        )
        for variant in ("", ".fp16")
        for ext in ("bin", "safetensors")
    ]
    + ["unet/config.json", "vae/config.json", "text_encoder/config.json"]
)
CLIP_MAIN = [  # openai/clip-vit-base-patch32: pytorch_model.bin, flax, tf
    "README.md",
    "config.json",
    "flax_model.msgpack",
    "merges.txt",
    "preprocessor_config.json",
    "pytorch_model.bin",
    "special_tokens_map.json",
    "tf_model.h5",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
]


def test_plan_takes_pickles_only_when_no_safetensors_exist() -> None:
    plan = plan_files(ZEROSCOPE_MAIN)
    assert plan.kind == "text-to-video"
    assert not any(p.startswith("zs2_576w/") or p.endswith(".md") for p in plan.files)
    assert set(plan.converts) == {
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
    }
    assert plan.targets["text_encoder/pytorch_model.bin"] == "text_encoder/model.safetensors"
    assert plan.files.index("unet/config.json") < plan.files.index(
        "unet/diffusion_pytorch_model.bin"
    )


def test_plan_prefers_safetensors_and_honours_the_variant() -> None:
    plain = plan_files(MODELSCOPE_MAIN)
    weights = [p for p in plain.files if "." in p and p.rsplit(".", 1)[1] in ("bin", "safetensors")]
    assert weights == [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    fp16 = plan_files(MODELSCOPE_MAIN, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16.files
    # stored under the default name, so diffusers loads it without variant=
    assert (
        fp16.targets["unet/diffusion_pytorch_model.fp16.safetensors"]
        == "unet/diffusion_pytorch_model.safetensors"
    )
    bf16 = plan_files(MODELSCOPE_MAIN, variant="bf16")
    assert "unet/diffusion_pytorch_model.safetensors" in bf16.files
    assert any("no 'bf16' weights" in note for note in bf16.notes)


def test_plan_for_clip_takes_model_processor_and_tokenizer_files() -> None:
    plan = plan_files(CLIP_MAIN, kind="clip")
    assert set(plan.files) == set(CLIP_MAIN) - {"README.md", "flax_model.msgpack", "tf_model.h5"}
    assert plan.targets["pytorch_model.bin"] == "model.safetensors"


def test_plan_refuses_a_repo_without_weights() -> None:
    with pytest.raises(ModelFormatError, match="unet/ holds no model weights"):
        plan_files([p for p in ZEROSCOPE_MAIN if p != "unet/diffusion_pytorch_model.bin"])


# -- downloads from the loopback hub ---------------------------------------------------------


def test_full_download_loads_and_records_the_commit(
    hub: FakeHub, tiny_repo: Repo, store_home: Path
) -> None:
    result = runner.invoke(app, ["download", REPO, "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    folder = Path(record["path"])
    assert folder == store_home / "models" / "acme--tiny-t2v"
    assert record["revision"] == tiny_repo.sha
    assert record["source"] == REPO
    parts = load_components(folder)
    assert parts.unet.config.sample_size == 16
    # only what the pipeline needs, each fetched once, nothing left over
    assert not (folder / "README.md").exists() and not (folder / "zs2_576w").exists()
    assert hub.gets["unet/diffusion_pytorch_model.fp16.safetensors"] == 0
    assert hub.gets["README.md"] == 0
    assert set(hub.gets.values()) == {1}
    assert _store_entries(store_home) == ["acme--tiny-t2v"]
    assert "MB" in result.stderr  # sizes in the progress / summary


def test_a_cut_file_is_resumed_with_a_range_request(
    hub: FakeHub, tiny_repo: Repo, tmp_path: Path
) -> None:
    hub.cut_at[UNET_WEIGHTS] = 5_000_000
    hub.cut_once.add(UNET_WEIGHTS)
    record = download(Store(tmp_path), REPO, endpoint=hub.endpoint)
    assert any(path == UNET_WEIGHTS for path, _ in hub.ranges)
    stored = (record.path / UNET_WEIGHTS).read_bytes()
    assert stored == tiny_repo.files[UNET_WEIGHTS]


def test_an_interrupted_download_resumes_on_the_next_run(
    hub: FakeHub, tiny_repo: Repo, tmp_path: Path
) -> None:
    store = Store(tmp_path)
    hub.cut_at[UNET_WEIGHTS] = 5_000_000  # every try is cut: the client gives up
    with pytest.raises(HubUnreachableError) as failure:
        download(store, REPO, endpoint=hub.endpoint)
    assert UNET_WEIGHTS in failure.value.message
    assert hub.waits, "gave up without retrying the cut file"
    assert "--from" in str(failure.value.hint) and "rerun" in str(failure.value.hint)
    assert store.model_record(REPO) is None
    assert _store_entries(tmp_path) == [".partial-acme--tiny-t2v"]
    finished = {p for p, n in hub.gets.items() if p != UNET_WEIGHTS}
    assert "vae/diffusion_pytorch_model.safetensors" in finished  # smaller weights came first

    hub.cut_at.clear()
    before = Counter(hub.gets)
    record = download(store, REPO, endpoint=hub.endpoint)
    assert record.revision == tiny_repo.sha
    assert all(hub.gets[p] == before[p] for p in finished), "finished files were fetched again"
    assert hub.gets[UNET_WEIGHTS] == before[UNET_WEIGHTS] + 1
    assert _store_entries(tmp_path) == ["acme--tiny-t2v"]


def test_a_missing_repo_says_check_the_id_and_exits_2(hub: FakeHub, store_home: Path) -> None:
    result = runner.invoke(app, ["download", "acme/nope"])
    assert result.exit_code == 2
    assert "'acme/nope' was not found" in result.stderr
    assert "check the id" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _store_entries(store_home) == []


def test_a_missing_file_names_it_and_leaves_nothing(
    hub: FakeHub, tiny_repo: Repo, store_home: Path
) -> None:
    tiny_repo.unserved.add("vae/diffusion_pytorch_model.safetensors")
    result = runner.invoke(app, ["download", REPO])
    assert result.exit_code == 1
    assert "vae/diffusion_pytorch_model.safetensors" in result.stderr
    assert "does not serve it" in result.stderr
    assert _store_entries(store_home) == []


def test_an_unknown_revision_is_a_usage_error(
    hub: FakeHub, tiny_repo: Repo, tmp_path: Path
) -> None:
    with pytest.raises(HubRepoNotFoundError, match="revision 'v9' does not exist"):
        download(Store(tmp_path), REPO, revision="v9", endpoint=hub.endpoint)
    assert _store_entries(tmp_path) == []


def test_a_gated_repo_needs_hf_token(
    hub: FakeHub, tiny_repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_repo.token = "hf_secret"
    with pytest.raises(HubAccessError) as failure:
        download(Store(tmp_path), REPO, endpoint=hub.endpoint)
    assert "HF_TOKEN" in str(failure.value.hint) and "license" in str(failure.value.hint)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert download(Store(tmp_path), REPO, endpoint=hub.endpoint).revision == tiny_repo.sha


def test_pickled_weights_are_converted_and_no_pickle_remains(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    files = _folder_files(tiny_model_dir)
    originals = {}
    for path in [p for p in files if p.endswith(".safetensors")]:
        state = load_file(str(tiny_model_dir / path))
        originals[path] = state
        buffer = tmp_path / "pickle.bin"
        torch.save(state, buffer)
        del files[path]
        bin_name = path.replace("model.safetensors", "pytorch_model.bin")
        if path.startswith(("unet/", "vae/")):
            bin_name = path.replace(".safetensors", ".bin")
        files[bin_name] = buffer.read_bytes()
    hub.repos["acme/old-t2v"] = Repo(files)
    record = download(Store(tmp_path / "store"), "acme/old-t2v", endpoint=hub.endpoint)
    assert not list(record.path.rglob("*.bin"))
    for path, state in originals.items():
        converted = load_file(str(record.path / path))
        assert converted.keys() == state.keys()
        assert all(torch.equal(converted[k], state[k]) for k in state)
    load_components(record.path)


def test_a_2d_unet_repo_is_refused_before_its_weights_are_fetched(
    hub: FakeHub, tiny_repo: Repo, tmp_path: Path
) -> None:
    config = json.loads(tiny_repo.files["unet/config.json"])
    config["_class_name"] = "UNet2DConditionModel"
    hub.repos["acme/image"] = Repo(
        {**tiny_repo.files, "unet/config.json": json.dumps(config).encode()}
    )
    with pytest.raises(ModelFormatError, match="UNet3DConditionModel"):
        download(Store(tmp_path), "acme/image", endpoint=hub.endpoint)
    assert hub.gets[UNET_WEIGHTS] == 0
    assert _store_entries(tmp_path) == []


def test_server_down_says_unreachable_and_suggests_from(hub: FakeHub, store_home: Path) -> None:
    hub.stop()
    result = runner.invoke(app, ["download", "zeroscope"])
    assert result.exit_code == 1
    assert "unreachable" in result.stderr
    assert "motionsep download zeroscope --from PATH" in result.stderr
    assert _store_entries(store_home) == []


def test_offline_mode_is_reported_before_any_request(tmp_path: Path) -> None:
    # conftest keeps HF_HUB_OFFLINE=1 for tests that do not use the `hub` fixture
    with pytest.raises(HubUnreachableError, match="offline mode"):
        download(Store(tmp_path), "zeroscope", endpoint="http://127.0.0.1:9")


def test_too_little_disk_space_says_how_much_and_where(
    hub: FakeHub, tiny_repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(
        "motionsep.hub.shutil.disk_usage", lambda p: real(p)._replace(free=1_000_000)
    )
    with pytest.raises(DiskFullError, match=r"MB needed, 1\.0 MB free") as failure:
        download(Store(tmp_path), REPO, endpoint=hub.endpoint)
    assert str(tmp_path / "models") in failure.value.message
    assert hub.gets.total() == 0


def test_a_missing_file_error_is_typed(hub: FakeHub, tiny_repo: Repo, tmp_path: Path) -> None:
    tiny_repo.unserved.add("unet/config.json")
    with pytest.raises(HubFileMissingError):
        download(Store(tmp_path), REPO, endpoint=hub.endpoint)


# -- --from and --list -----------------------------------------------------------------------


def test_import_from_a_folder_copies_and_verifies(tiny_model_dir: Path, store_home: Path) -> None:
    result = runner.invoke(app, ["download", "mine", "--from", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["source"] == str(tiny_model_dir.resolve())
    load_components(Path(record["path"]))
    assert (tiny_model_dir / MODEL_RECORD).is_file()  # the source is left as it was


def test_import_refuses_a_folder_that_is_not_a_t2v_model(
    tiny_model_dir: Path, tmp_path: Path, store_home: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    result = runner.invoke(app, ["download", "mine", "--from", str(broken)])
    assert result.exit_code == 2  # bad input: the folder is not a model we can use
    assert "unet/ folder is missing" in result.stderr
    assert _store_entries(store_home) == []
    flat = tmp_path / "flat"
    shutil.copytree(tiny_model_dir, flat)
    config = json.loads((flat / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (flat / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="UNet3DConditionModel"):
        import_folder(Store(store_home), flat, "flat")
    assert _store_entries(store_home) == []


def test_list_json_shows_the_installed_model_with_size_and_revision(
    hub: FakeHub, tiny_repo: Repo, store_home: Path
) -> None:
    assert runner.invoke(app, ["download", REPO]).exit_code == 0
    result = runner.invoke(app, ["download", "--list", "--json"])
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    row = rows[REPO]
    assert row["installed"] and row["revision"] == tiny_repo.sha
    assert row["size_bytes"] > 20_000_000
    assert not rows["zeroscope"]["installed"]


def test_clip_with_pickled_weights_loads_as_clipmodel_and_processor(
    hub: FakeHub, tmp_path: Path
) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from motionsep.model.components import tiny_vocab

    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**tiny, "vocab_size": len(vocab), "num_attention_heads": 4},
        vision_config={**tiny, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    source = tmp_path / "clip-src"
    model.save_pretrained(source)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(source)
    state = model.state_dict()
    # the real openai/clip-vit-base-patch32 ships pytorch_model.bin (+ flax and tf weights)
    (source / "model.safetensors").unlink()
    torch.save(state, source / "pytorch_model.bin")
    (source / "flax_model.msgpack").write_bytes(b"flax weights")
    hub.repos["openai/clip-vit-base-patch32"] = Repo(_folder_files(source))

    record = download(Store(tmp_path / "store"), "clip", endpoint=hub.endpoint)
    assert hub.gets["flax_model.msgpack"] == 0
    assert not list(record.path.glob("*.bin"))
    loaded = CLIPModel.from_pretrained(record.path)
    CLIPProcessor.from_pretrained(record.path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# -- integrity of installed models ---------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_tiny_model_is_refused_at_use_and_repaired_on_request(store_home: Path) -> None:
    installed = runner.invoke(app, ["download", "tiny", "--json"])
    assert installed.exit_code == 0, installed.stderr
    folder = Path(json.loads(installed.stdout)["path"])
    record = json.loads((folder / "motionsep-model.json").read_text())
    assert UNET_WEIGHTS in record["files"]  # every file's size and sha256
    weights = folder / UNET_WEIGHTS
    intact = weights.read_bytes()
    _flip_byte(weights, len(intact) // 2)  # a flipped byte in the U-Net: same size

    # using it fails with the fix, before any work; nothing is deleted
    out = store_home.parent / "cat.mp4"
    used = runner.invoke(
        app,
        ["generate", "a cat", "--motion", "none", "--set", "model.name=tiny", "--out", str(out)],
    )
    assert used.exit_code == 2, used.stderr
    assert "damaged" in used.stderr and UNET_WEIGHTS in used.stderr
    assert "motionsep download tiny --repair" in used.stderr
    assert weights.exists() and not out.exists()
    checked = runner.invoke(app, ["download", "tiny"])
    assert checked.exit_code == 2 and "--repair" in checked.stderr

    repaired = runner.invoke(app, ["download", "tiny", "--repair"])
    assert repaired.exit_code == 0, repaired.stderr
    assert weights.read_bytes() == intact
    again = runner.invoke(app, ["download", "tiny", "--repair"])
    assert again.exit_code == 0 and "intact" in again.stderr

    weights.unlink()  # deleted weights: the record notices the missing file
    with pytest.raises(DamagedModelError, match="is missing"):
        Store(store_home).resolve_model("tiny")
    assert runner.invoke(app, ["download", "tiny", "--repair"]).exit_code == 0
    assert weights.read_bytes() == intact


def test_an_edited_file_is_caught_at_use_and_a_rotted_one_by_download(
    hub: FakeHub, tiny_repo: Repo, tmp_path: Path
) -> None:
    import os

    store = Store(tmp_path)
    record = download(store, REPO, endpoint=hub.endpoint)
    store.resolve_model(REPO)  # the first use hashes every file once
    weights = record.path / "vae" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    _flip_byte(weights, stat.st_size - 10)
    # a bit that rots on disk keeps the file's time: use checks sizes and times alone...
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    store.resolve_model(REPO)
    # ...and `download` hashes everything
    with pytest.raises(DamagedModelError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        download(store, REPO, endpoint=hub.endpoint)
    before = Counter(hub.gets)
    repaired = download(store, REPO, endpoint=hub.endpoint, repair=True)
    assert repaired.revision == tiny_repo.sha  # the same commit again
    assert (
        hub.gets["vae/diffusion_pytorch_model.safetensors"]
        == before["vae/diffusion_pytorch_model.safetensors"] + 1
    )
    os.utime(weights)  # an edit in place changes the time: the next use hashes it again
    _flip_byte(weights, 100)
    with pytest.raises(DamagedModelError):
        store.resolve_model(REPO)
