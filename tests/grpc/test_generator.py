"""Generator through the real stack: SDK → gRPC → generator → Triton (tiny models)."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

import clinisynth
from clinisynth.v1 import common_pb2, generator_pb2, generator_pb2_grpc

pytestmark = pytest.mark.stack


def test_list_models_shows_kind_classes_size_digest(sdk_client):
    models = {m.name: m for m in sdk_client.list_models()}
    assert models["cells-tiny"].kind == "class_conditional"
    assert models["cells-tiny"].classes == ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
    assert (models["cells-tiny"].width, models["cells-tiny"].channels) == (16, 1)
    assert models["chest-tiny"].kind == "text_to_image"
    assert models["fundus-tiny"].kind == "unconditional"
    assert all(len(m.digest) == 64 for m in models.values())
    only_text = sdk_client.list_models("text_to_image")
    assert [m.name for m in only_text] == ["chest-tiny"]


def test_class_conditional_generation_is_deterministic_per_seed(sdk_client):
    a = sdk_client.generate("cells-tiny", class_name="neutrophil", n=2, seed=7, steps=4)
    b = sdk_client.generate("cells-tiny", class_name="neutrophil", n=2, seed=7, steps=4)
    c = sdk_client.generate("cells-tiny", class_name="neutrophil", n=1, seed=8, steps=4)
    assert len(a) == 2
    pa, pb = [i.to_numpy() for i in a], [i.to_numpy() for i in b]
    assert pa[0].shape == (16, 16)
    np.testing.assert_array_equal(pa[0], pb[0])
    np.testing.assert_array_equal(pa[1], pb[1])
    # Image i uses seed + i: the second image of seed 7 is the first of seed 8.
    np.testing.assert_allclose(pa[1], c.images[0].to_numpy(), atol=1 / 255)
    assert not np.array_equal(pa[0], pa[1])
    prov = a.images[0].provenance
    assert prov["seed"] == "7" or prov["seed"] == 7
    assert prov["class_name"] == "neutrophil" and prov["sampler"] == "ddim"
    assert prov["model"]["name"] == "cells-tiny"


def test_png_embeds_provenance(sdk_client):
    res = sdk_client.generate("cells-tiny", class_name="monocyte", seed=3, steps=2)
    png = Image.open(io.BytesIO(res.images[0].data))
    assert "clinisynth:provenance" in png.info
    embedded = json.loads(png.info["clinisynth:provenance"])
    assert embedded["class_name"] == "monocyte" and embedded["seed"] == 3
    assert embedded["model_name"] == "cells-tiny"


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "euler", "ddpm"])
def test_text_to_image_with_every_sampler(sdk_client, sampler):
    res = sdk_client.generate(
        "chest-tiny",
        prompt="small left pleural effusion",
        seed=1,
        steps=3,
        sampler=sampler,
        guidance_scale=3.0,
    )
    img = res.images[0].to_numpy()
    assert img.shape == (32, 32)
    assert np.isfinite(img).all() and img.std() > 0


def test_png16_and_raw_formats(sdk_client):
    res16 = sdk_client.generate(
        "cells-tiny", class_name="eosinophil", seed=2, steps=2, format="png16"
    )
    assert np.asarray(Image.open(io.BytesIO(res16.images[0].data))).dtype == np.uint16
    raw = sdk_client.generate("cells-tiny", class_name="eosinophil", seed=2, steps=2, format="raw")
    arr = raw.images[0].to_numpy()
    assert arr.dtype == np.float32 and arr.shape == (16, 16)
    np.testing.assert_allclose(arr, res16.images[0].to_numpy(), atol=1 / 65535 + 1e-6)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"model": "nope", "class_name": "x"}, "model.name"),
        ({"model": "cells-tiny", "class_name": "platelet"}, "class_name"),
        ({"model": "cells-tiny"}, "class_name"),
        ({"model": "cells-tiny", "class_name": "monocyte", "sampler": "heun"}, "sampler"),
        ({"model": "cells-tiny", "class_name": "monocyte", "n": 99}, "num_images"),
        ({"model": "cells-tiny", "class_name": "monocyte", "width": 17}, "width"),
        ({"model": "chest-tiny", "prompt": "   "}, "prompt"),
        ({"model": "chest-tiny", "prompt": "x", "steps": 5000}, "steps"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(sdk_client, options, field):
    model = options.pop("model")
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        sdk_client.generate(model, **options)
    assert field in info.value.fields


def test_streaming_reports_each_step_and_previews(sdk_client):
    events = []
    res = sdk_client.generate(
        "cells-tiny",
        class_name="lymphocyte",
        seed=5,
        steps=4,
        preview_every=2,
        progress=events.append,
    )
    steps = [e.step for e in events if e.stage == "denoise"]
    assert steps == [1, 2, 3, 4]
    previews = [e for e in events if e.stage == "preview"]
    assert len(previews) == 2 and previews[0].preview_png.startswith(b"\x89PNG")
    assert len(res) == 1


def test_client_written_from_protos_alone(generator_server):
    """No SDK: a raw stub built from the generated code only."""
    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        resp = stub.Generate(
            generator_pb2.GenerateRequest(
                model=common_pb2.ModelRef(name="fundus-tiny"),
                seed=1,
                steps=2,
                format=common_pb2.IMAGE_FORMAT_PNG,
            ),
            timeout=120,
        )
        img = Image.open(io.BytesIO(resp.images[0].image.encoded))
        assert img.mode == "RGB" and img.size == (16, 16)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(
                generator_pb2.GenerateRequest(model=common_pb2.ModelRef(name="")), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
