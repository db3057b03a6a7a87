"""A registered swin-pipeline model as an MLflow pyfunc "models from code" model.

Every registered version carries a copy of this file at its root (its MLmodel names it), so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and `mlflow models serve` run it: it is the only code of a
version, loaded by MLflow, never by this project's own pull. It imports only what a serving host has (mlflow,
torch, timm, safetensors through timm, PIL, pandas), never swin-pipeline, and nothing is unpickled: the weights
are the version's `artifacts/model/` folder (the project's export: model.safetensors, model.json and timm's
config.json), which timm itself loads (`timm.create_model("local-dir:...")`) and whose timm data config gives the
eval transform, the same pixels `python -m pipeline.predict` feeds.

The weights are checked against the sha256 recorded when the version was built (MLmodel's model_config
`weights_sha256`): other bytes under the version's name fail the load, naming the file.

Input: a DataFrame column `image` of encoded image bytes (JPEG, PNG, ...; base64 strings in a REST request, which
MLflow decodes as the signature's binary type says); parameter `top_k` (default 5).
Output, a row per image: `label` (the top synset), `name` (WordNet's words for it, "" if none), `probability`,
`top_labels` and `top_probabilities` (top_k).
A bad request (no image, not an image, a truncated file, too many pixels) raises MlflowException with
INVALID_PARAMETER_VALUE, which the scoring server answers with a 400 naming the problem and the row.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import warnings

import mlflow
import pandas as pd
import timm
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, ImageFile, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # 8K photos are ~33 MP; a file that claims more is refused before it is decoded
MAX_IMAGES = 256  # per request: a bigger batch is the client's to split
BATCH = 32  # images per forward pass
BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value, row: int) -> bytes:
    """The encoded image of one row: bytes as the signature gives them, or base64 text (a REST request in the
    `inputs` format reaches the model undecoded, as does a caller that skipped the schema). Base64 text is told
    apart by its alphabet: an encoded image starts with bytes outside it (JPEG FF D8, PNG 89 50, ...)."""
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, bytes):
        raise bad_request(
            f"image {row}: {type(value).__name__} given; send the encoded file's bytes (base64 over REST)"
        )
    if value and BASE64_TEXT.fullmatch(value):
        try:
            return base64.b64decode(value)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"image {row}: base64 text that does not decode ({e})") from None
    return value


def decode(data: bytes, row: int) -> Image.Image:
    """An RGB PIL image, or a bad request naming the row and what is wrong with it."""
    if not data:
        raise bad_request(f"image {row}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise bad_request(
                    f"image {row}: too many pixels, {width}x{height} is over the limit of "
                    f"{MAX_PIXELS:,} (a decompression bomb, or a photo to downscale first)"
                )
            image.load()  # decodes now: a truncated file fails here, not inside the transform
            return image.convert("RGB")
    except MlflowException:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bad_request(f"image {row}: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise bad_request(
            f"image {row}: not an image ({len(data)} bytes that PIL cannot identify; send JPEG, PNG, WebP, ...)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"image {row}: cannot be decoded ({e}): a truncated or corrupt file") from None


def check_weights(folder: str, expected: str | None) -> None:
    """Raises MlflowException unless the folder's model.safetensors has the sha256 the version recorded (a
    version built before the checksum was recorded has none: nothing to check)."""
    if not expected:
        return
    path = os.path.join(folder, "model.safetensors")
    digest = hashlib.sha256()  # this file cannot import swin-pipeline's own file_sha256
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise MlflowException(
            f"{version_name(folder)}: {path} has sha256 {digest.hexdigest()}, but the version "
            f"recorded {expected} when it was registered: not the weights of this version "
            f"(changed or mixed up after registration); pull the version again"
        )


def version_name(folder: str) -> str:
    """models:/NAME/VERSION as MLflow's loader recorded it beside the version's files (`registered_model_meta`,
    two YAML lines, read as text), or "this model version" when it did not (a model loaded by path)."""
    try:
        with open(os.path.join(folder, os.pardir, os.pardir, "registered_model_meta")) as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    except OSError:
        return "this model version"
    name, version = fields.get("model_name", "").strip(" '\""), fields.get("model_version", "").strip(" '\"")
    return f"models:/{name}/{version}" if name and version else "this model version"


class SwinClassifier(PythonModel):
    def load_context(self, context):
        folder = context.artifacts["model"]
        check_weights(folder, (context.model_config or {}).get("weights_sha256"))
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, never half an image
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval().to(self.device)
        self.labels = list(self.model.pretrained_cfg.get("label_names") or [])
        self.descriptions = dict(self.model.pretrained_cfg.get("label_descriptions") or {})
        data_config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**data_config, is_training=False)

    # the DataFrame hint tells MLflow there is no schema to infer from it (the signature is given at registration),
    # instead of a warning at every load asking for hints
    def predict(self, context, model_input: pd.DataFrame, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise bad_request(f"no `image` column (columns: {', '.join(map(str, frame.columns)) or 'none'})")
        values = list(frame["image"])
        if not values:
            raise bad_request("no image in the request: send at least one row")
        if len(values) > MAX_IMAGES:
            raise bad_request(f"{len(values)} images in one request: at most {MAX_IMAGES}")
        top_k = int((params or {}).get("top_k") or 5)
        if top_k < 1:
            raise bad_request(f"top_k={top_k}: give 1 or more")
        pixels = torch.stack([self.transform(decode(image_bytes(v, row), row)) for row, v in enumerate(values)])
        probs = []
        with torch.inference_mode():
            for start in range(0, len(pixels), BATCH):
                batch = pixels[start : start + BATCH].to(self.device)
                probs.append(self.model(batch).float().softmax(dim=1).cpu())
        top = torch.cat(probs).topk(min(top_k, len(self.labels) or probs[0].shape[1]), dim=1)
        names = [[self.label(i) for i in row] for row in top.indices.tolist()]
        values = top.values.tolist()
        return pd.DataFrame(
            {
                "label": [n[0] for n in names],
                "name": [self.descriptions.get(n[0], "") for n in names],
                "probability": [v[0] for v in values],
                "top_labels": names,
                "top_probabilities": values,
            }
        )

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)


mlflow.models.set_model(SwinClassifier())
