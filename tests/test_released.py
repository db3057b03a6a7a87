"""Released Swin weights read into this project's layout (pipeline/model/released.py): Microsoft's release files,
timm names and folders, Hugging Face transformers folders. Every file is written by the library that produces it
(timm, transformers, torch.save of the official layout built by its documented renames), from small random Swins
at 224/window 7 and 384/window 12, and the import must give that library's own logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models._hub import save_for_hf
from timm.models.swin_transformer import checkpoint_filter_fn
from transformers import SwinConfig, SwinForImageClassification

from pipeline.model import create_model
from pipeline.model.released import ReleasedModel, ReleasedWeightsError, read_released, released_kind
from released_files import microsoft_state, perturbed
from servers import REPO

SIZES = [(224, 7), (384, 12)]
LABELS = [f"n{i:08d}" for i in range(10)]
NANO = {"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]}  # swin_nano in transformers' terms


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one intra-op thread is faster than two fighting over a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nano(size: int, window: int, classes: int = len(LABELS)) -> torch.nn.Module:
    return perturbed(create_model("swin_nano", size, window, classes))


def same_logits(released: ReleasedModel, reference, size: int) -> None:
    """`released` built by create_model gives `reference`'s logits (fp32, eval) on the same images."""
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in released.state.values())
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in released.state)
    model = create_model(released.arch, released.img_size, released.window_size, released.num_classes).eval()
    model.load_state_dict(released.state, strict=True)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


# --- Microsoft's release files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,window", SIZES)
def test_a_microsoft_release_file_reads_back_to_its_own_logits(tmp_path, size, window):
    source = nano(size, window)
    path = tmp_path / f"swin_nano_patch4_window{window}_{size}_22k.pth"
    torch.save({"model": microsoft_state(source), "epoch": 30, "max_accuracy": 81.5}, path)
    # timm's own filter reads the official layout back to the same tensors
    filtered = checkpoint_filter_fn(torch.load(path, weights_only=True), source)
    assert filtered.keys() == source.state_dict().keys()
    assert all(torch.equal(filtered[k], v) for k, v in source.state_dict().items())

    released = read_released(path)
    assert (released.arch, released.img_size, released.window_size, released.num_classes) == (
        "swin_nano",
        size,
        window,
        10,
    )
    assert (released.source_format, released.label_names, released.name_hint) == ("microsoft", None, path.name)
    assert str(path.absolute()) in released.description and "attn_mask" in released.description
    same_logits(released, source, size)


def test_the_image_size_is_read_from_microsofts_masks(tmp_path):
    """448 at window 7 (the last stage two windows wide): the convention would say 224, the masks say 448."""
    source = nano(448, 7)
    path = tmp_path / "w7_448.pth"
    torch.save({"model": microsoft_state(source)}, path)
    released = read_released(path)
    assert (released.img_size, released.window_size) == (448, 7)
    assert "layers.0.blocks.1.attn_mask (256 windows)" in released.description
    same_logits(released, source, 448)


class Reduces:
    """Unpickling this calls open(): a file that would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class CfgNode(dict):
    """Like yacs's CfgNode, which the official training checkpoints carry under `config`."""


@pytest.mark.parametrize("extra", ["code", "yacs"])
def test_a_pickle_that_needs_more_than_tensors_is_refused_unexecuted(tmp_path, extra):
    marker = tmp_path / "ran"
    path = tmp_path / "swin_base_patch4_window7_224_22k.pth"
    config = Reduces(marker) if extra == "code" else CfgNode(MODEL=CfgNode(TYPE="swin"))
    torch.save({"model": microsoft_state(nano(224, 7)), "config": config}, path)
    with pytest.raises(ReleasedWeightsError) as e:
        read_released(path)
    message = str(e.value)
    assert str(path.absolute()) in message and "nothing from it was executed" in message
    assert "weights_only=False" in message  # what to do, if the user trusts the file
    assert ("io.open" if extra == "code" else "CfgNode") in message
    assert not marker.exists()


@pytest.fixture(scope="module")
def ms_224() -> dict[str, torch.Tensor]:
    return microsoft_state(nano(224, 7))


@pytest.mark.parametrize(
    "edit,named",
    [
        ("missing", "missing key layers.0.downsample.norm.weight"),
        ("extra", "unknown key layers.0.blocks.0.attn.extra_scale"),
        ("shape", "layers.1.blocks.1.attn.relative_position_bias_table has shape [225, 2]"),
        ("mask", "image size 112 from layers.0.blocks.1.attn_mask (16 windows)"),
        ("not a swin", "embed dim 48 (patch_embed.proj.weight rows)"),
        ("no head", "missing head.weight"),
    ],
)
def test_a_key_that_does_not_fit_is_named(tmp_path, ms_224, edit, named):
    state = dict(ms_224)
    if edit == "missing":
        del state["layers.0.downsample.norm.weight"]
    elif edit == "extra":
        state["layers.0.blocks.0.attn.extra_scale"] = torch.ones(1)
    elif edit == "shape":
        state["layers.1.blocks.1.attn.relative_position_bias_table"] = torch.zeros(225, 2)
    elif edit == "mask":
        state["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 49, 49)
    elif edit == "not a swin":
        state["patch_embed.proj.weight"] = torch.zeros(48, 3, 4, 4)
    else:
        del state["head.weight"], state["head.bias"]
    path = tmp_path / "edited.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ReleasedWeightsError, match=re.escape(named)) as e:
        read_released(path)
    assert str(path.absolute()) in str(e.value)


# --- Hugging Face transformers -----------------------------------------------------------------------------------


def transformers_model(size: int, window: int, id2label: bool = True) -> SwinForImageClassification:
    """A small random SwinForImageClassification computing timm's function (transformers' defaults, spelled out)."""
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {s: i for i, s in enumerate(LABELS)}}
    config = SwinConfig(
        image_size=size,
        window_size=window,
        patch_size=4,
        num_labels=len(LABELS),
        hidden_act="gelu",  # timm: nn.GELU (erf)
        layer_norm_eps=1e-5,  # timm: nn.LayerNorm's default
        qkv_bias=True,
        mlp_ratio=4.0,
        use_absolute_embeddings=False,
        **NANO,
        **(labels if id2label else {}),
    )
    return perturbed(SwinForImageClassification(config))


def hf_logits(model: SwinForImageClassification):
    return lambda x: model(pixel_values=x).logits


@pytest.mark.parametrize("size,window", SIZES)
def test_a_transformers_folder_gives_transformers_logits(tmp_path, size, window):
    source = transformers_model(size, window)
    source.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    # transformers 5 writes the older names (its conversion mapping reversed), so older readers still read them
    assert "swin.encoder.layers.0.blocks.0.attention.self.query.weight" in keys
    assert released_kind(tmp_path) == "transformers"
    released = read_released(tmp_path)
    assert (released.arch, released.img_size, released.window_size, released.num_classes) == (
        "swin_nano",
        size,
        window,
        10,
    )
    assert (released.source_format, released.label_names) == ("transformers", LABELS)
    assert "image_size" in released.description
    same_logits(released, hf_logits(source), size)


@pytest.mark.parametrize("form", ["current names", "pytorch_model.bin"])
def test_both_name_generations_and_the_bin_file_read(tmp_path, form):
    source = transformers_model(224, 7, id2label=False)
    if form == "current names":
        source.save_pretrained(tmp_path, save_original_format=False)  # the model's own 5.x names
        assert "swin.encoder.layers.0.blocks.0.attention.q_proj.weight" in load_file(tmp_path / "model.safetensors")
    else:  # what transformers 4 wrote (5 writes safetensors only): the same tensors torch.save'd as a state dict,
        source.save_pretrained(tmp_path)  # with the relative_position_index buffers 4 kept persistent
        state = load_file(tmp_path / "model.safetensors")
        for name, buffer in source.named_buffers():
            if name.endswith("relative_position_index"):
                state[name.replace("attention.relative_position_bias.", "attention.self.")] = buffer
        assert "swin.encoder.layers.0.blocks.0.attention.self.relative_position_index" in state
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    # transformers itself reads the folder back to the same model
    same = SwinForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(same(pixel_values=x).logits, source(pixel_values=x).logits)
    released = read_released(tmp_path)
    assert released.label_names is None  # transformers' placeholders LABEL_0... say nothing of the rows
    same_logits(released, hf_logits(source), 224)


def test_a_transformers_folder_of_another_function_is_refused(tmp_path):
    source = transformers_model(224, 7)
    source.config.use_absolute_embeddings = True
    source.save_pretrained(tmp_path)
    with pytest.raises(ReleasedWeightsError, match="use_absolute_embeddings is True"):
        read_released(tmp_path)


# --- timm -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,window", SIZES)
def test_a_timm_folder_gives_timms_logits(tmp_path, size, window):
    source = nano(size, window)
    save_for_hf(source, tmp_path, safe_serialization=True, model_config={"label_names": LABELS})
    assert released_kind(tmp_path) == "timm"
    released = read_released(tmp_path)
    assert (released.arch, released.img_size, released.window_size) == ("swin_nano", size, window)
    assert (released.source_format, released.label_names) == ("timm", LABELS)
    assert "input_size" in released.description
    same_logits(released, source, size)
    timm_own = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    same_logits(released, timm_own, size)


def test_a_timm_name_with_its_file(tmp_path):
    """swin_tiny_patch4_window7_224.ms_in1k (1000 classes) from a file saved from that timm model."""
    source = timm.create_model("swin_tiny_patch4_window7_224", num_classes=1000).eval()  # random: timm's init
    file = tmp_path / "weights.pth"
    torch.save(source.state_dict(), file)
    released = read_released("timm:swin_tiny_patch4_window7_224.ms_in1k", file=file)
    assert (released.arch, released.img_size, released.window_size, released.num_classes) == (
        "swin_tiny",
        224,
        7,
        1000,
    )
    assert (released.source_format, released.name_hint) == ("timm", "swin_tiny_patch4_window7_224.ms_in1k")
    same_logits(released, source, 224)


def test_a_timm_name_not_in_the_cache_is_refused_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ReleasedWeightsError, match="Hugging Face cache"):
        read_released("timm:swin_tiny_patch4_window7_224.ms_in22k")
    with pytest.raises(ReleasedWeightsError, match="timm could not load it"):
        read_released("timm:no_such_model_anywhere")


# --- which kind ---------------------------------------------------------------------------------------------------


def test_released_kind_tells_the_sources_apart(tmp_path):
    model = nano(224, 7)
    ms = tmp_path / "swin.pth"
    torch.save({"model": microsoft_state(model)}, ms)
    save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    transformers_model(224, 7).save_pretrained(tmp_path / "hf")
    save_for_hf(model, tmp_path / "export", safe_serialization=True)  # + model.json: this project's export
    (tmp_path / "export" / "model.json").write_text(json.dumps({"synsets": LABELS}))
    save_for_hf(model, tmp_path / "config only", safe_serialization=True)
    (tmp_path / "config only" / "model.safetensors").unlink()
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    assert released_kind(ms) == released_kind(str(ms)) == "microsoft"
    assert released_kind("timm:swin_base_patch4_window7_224.ms_in22k") == "timm"
    assert released_kind(tmp_path / "timm") == "timm"
    assert released_kind(tmp_path / "hf") == "transformers"
    for none in ("export", "config only", "random", "missing.pth", "timm/model.safetensors", "random/notes.txt"):
        assert released_kind(tmp_path / none) is None, none
    with pytest.raises(ReleasedWeightsError, match="not a released Swin"):
        read_released(tmp_path / "export")
    # the pre-launch check calls it before torch is imported
    code = (
        "import sys; from swin_common.released_kind import released_kind; "
        f"assert released_kind({str(ms)!r}) == 'microsoft'; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True
    )
    assert out.stdout.decode().strip() == "False", out.stderr.decode()


def test_init_from_takes_every_released_kind(tmp_path):
    """The pre-launch check and the ranks' load_source take a timm folder and a transformers folder (their declared
    labels) and a Microsoft file; a head of a size no released Swin has, with no labels, is refused naming the file."""
    from pipeline.engine.init_source import check_init_source
    from pipeline.engine.model_export import load_source
    from pipeline.model.head_layouts import HeadLayoutError

    model = nano(224, 7)
    save_for_hf(model, tmp_path / "timm", safe_serialization=True, model_config={"label_names": LABELS})
    transformers_model(224, 7).save_pretrained(tmp_path / "hf")
    torch.save({"model": microsoft_state(model)}, tmp_path / "swin.pth")
    for kind in ("timm", "hf"):
        assert check_init_source(tmp_path / kind).endswith(f"folder {tmp_path / kind}")
        source = load_source(tmp_path / kind)
        assert source.synsets == LABELS and source.meta["head_layout"] == "declared by the source"
        create_model("swin_nano", 224, 7, len(LABELS)).load_state_dict(source.state, strict=True)
    assert check_init_source(tmp_path / "swin.pth") == f"released weights {tmp_path / 'swin.pth'}"
    with pytest.raises(HeadLayoutError, match=f"{tmp_path / 'swin.pth'}.* a head of 10 rows .*--labels"):
        load_source(tmp_path / "swin.pth")
