"""The README's Python blocks run as written: each ```python block, in order, in a folder holding tiny stand-ins for
the folders the blocks read (``export/`` in timm's layout, ``export-onnx/``, a DINOv2 and a ViT-Ti/16 folder as
Hugging Face's ``save_pretrained`` writes them). The AOTInductor block is skipped: compiling its package takes
minutes on a CPU."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import vit
from vit.export import export_model

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)
# a ViT with the name's patch (16) at 224, small enough to run in a blink; depth 4 for get_intermediate_layers(n=4)
NET = dict(embed_dim=32, depth=4, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folders the README's blocks name, made small."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("readme")
    net = vit.create_model("vit_tiny_patch16_224", **NET).eval()
    export_model(net, "timm", root / "export")
    if _has("onnxruntime") and _has("onnx"):
        # the block only reads an ONNX graph with input "images"; torch's TorchScript exporter writes one in seconds,
        # where `vit export --format onnx` (tests/test_export.py) takes about a minute on a loaded 2-core CPU
        (root / "export-onnx").mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(root / "export-onnx" / "model.onnx"),
                              input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "batch"}},
                              dynamo=False)
    dinov2 = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=518)
    transformers.Dinov2Model(dinov2).save_pretrained(root / "dinov2-small")
    # vit_tiny_patch16_224's shape, with Hugging Face ViT's names
    tiny = transformers.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                  intermediate_size=768, image_size=224, patch_size=16, num_labels=1000)
    transformers.ViTForImageClassification(tiny).save_pretrained(root / "vit-tiny-patch16-224")
    return root


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 6, "the README's Python examples were not found"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: BLOCKS[i].strip().splitlines()[0][:40])
def test_readme_block_runs(index: int, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = BLOCKS[index]
    if "onnxruntime" in code and not (folder / "export-onnx").is_dir():
        pytest.skip("onnxruntime / onnx not installed (pip install 'vitkit[onnx]')")
    if "aoti_load_package" in code:  # compiled C++: minutes on a CPU
        pytest.skip("an AOTInductor export takes minutes to compile")
    monkeypatch.chdir(folder)
    torch.manual_seed(0)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
