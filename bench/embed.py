"""embed: images/s of an open_clip image tower with random weights (pretrained=None; no
download) against the bound set by its FLOPs.

FLOPs per image: torch.utils.flop_counter.FlopCounterMode over one `encode_image` of a
single image (matrix products, convolutions and attention; 2 FLOP per multiply-add;
ViT-B-32 at 224 px: 8.8 GFLOP).
Limit: images/s = matmul FLOP/s / FLOPs per image (fp32 on CPU; bf16 on CUDA, where the
encoder runs under bf16 autocast).

Three measurements:
  model     encode_image on batches of random (B, 3, H, W) tensors (no decoding): the
            figure compared with the bound.
  pipeline  OpenClipEncoder.encode (the `lra embed` code path: PNG decode, validation
            transform, DataLoader, forward) on a table of synthetic 32 x 32 PNGs (2
            batches): the same model through the real code path.
  memory    the same code path with a tiny registered ViT (`bench-tiny-vit`, 32 px) over
            2,000 and 8,000 images, so that thousands of images take seconds: peak memory
            beyond the arrays encode must hold (the table and the (n, dim) output) should
            not grow with n; `memory_growth_bytes_per_image` says by how much it does
            (a batch of the real model's activations is a constant on top).
Embedding a whole scale (45,000+ images) is not run: `seconds_at_scale` extrapolates.
"""

from __future__ import annotations

from typing import Any

from bench.records import record

TARGET = 0.5


def model_child(*, model: str, device: str, batch: int, batches: int) -> dict[str, Any]:
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.measure import MemoryProbe, Timer

    probe = MemoryProbe(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = open_clip.create_model(model, pretrained=None, device=device).eval()
    size = net.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    # Counted with autograd on: in no_grad / inference mode nn.MultiheadAttention takes its
    # fused fast path, whose projections FlopCounterMode does not see (ViT-B-32: 5.9
    # instead of 8.8 GFLOP). The timed runs below do use that fast path, as the encoder does.
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        net.encode_image(torch.zeros(1, 3, h, w, device=device))
    flops = counter.get_total_flops()
    with torch.inference_mode():
        x = torch.randn(batch, 3, h, w, device=device, generator=torch.Generator(device).manual_seed(0))
        cuda = device.startswith("cuda")
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast(
            "cpu", enabled=False)
        with amp:
            net.encode_image(x, normalize=False)  # warm-up
            with Timer(device) as timer:
                for _ in range(batches):
                    feats = net.encode_image(x, normalize=False)
    return {"model": model, "device": device, "precision": "amp_bf16" if cuda else "fp32",
            "image_size": [h, w], "batch": batch, "images": batch * batches,
            "dim": int(feats.shape[-1]), "flops_per_image": flops, "seconds": timer.seconds,
            **probe.report(),
            "array_bytes": sum(p.numel() * p.element_size() for p in net.parameters())
            + x.numel() * 4}


TINY = "bench-tiny-vit"  # registered in the child: a memory check needs thousands of images
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8,
                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2,
                         "layers": 1}}


def _register_tiny() -> None:
    import json
    import tempfile
    from pathlib import Path

    import open_clip

    path = Path(tempfile.mkdtemp()) / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)


def pipeline_child(*, model: str, device: str, batch: int, images: int) -> dict[str, Any]:
    import numpy as np

    from bench.measure import MemoryProbe, Timer
    from pipeline.encoders import RuntimeOptions
    from pipeline.encoders.clip import OpenClipEncoder
    from pipeline.images import encode_png
    from pipeline.sources import make_table

    if model == TINY:
        _register_tiny()
    encoder = OpenClipEncoder(model=model, pretrained=None)
    encoder.load(device)
    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(images)]
    table = make_table(split=np.array(["train"] * images), label=np.zeros(images, np.int64),
                       clean_label=None, image=pngs)
    del pngs
    runtime = RuntimeOptions(device=device, batch_size=batch, workers=0, progress=False)
    encoder.encode(table.slice(0, min(images, batch)), root=None, runtime=runtime)  # warm-up
    # The probe starts with the table already built (building it is this benchmark's
    # doing, not the stage's); the table is added back below as memory the stage holds.
    probe = MemoryProbe(device)
    with Timer(device) as timer:
        out = encoder.encode(table, root=None, runtime=runtime)
    mem = probe.report()
    mem["peak_memory_bytes"] += table.nbytes
    return {"model": model, "device": device, "batch": batch, "images": images,
            "seconds": timer.seconds, **mem, "array_bytes": table.nbytes + out.nbytes,
            "image_bytes": table.column("image").nbytes}


def records(raw: dict[str, Any], *, scale: str, n: int, matmul: dict) -> list[dict]:
    m = raw["model"]
    limit_flops = matmul.get("bf16") if m["precision"] == "amp_bf16" else matmul["fp32"]
    ips = m["images"] / m["seconds"]
    bound = limit_flops / m["flops_per_image"]
    out = [record(
        "embed", scale, variant=f"{m['model']} model ({m['device']}, {m['precision']}, "
                                f"batch {m['batch']})",
        seconds=m["seconds"], peak_memory_bytes=m["peak_memory_bytes"], throughput=ips,
        throughput_unit="images/s", limit=bound,
        limit_kind="matmul FLOP/s / model FLOPs per image", array_bytes=m["array_bytes"],
        target={"fraction_of_limit": TARGET}, images=m["images"], batch=m["batch"],
        flops_per_image=m["flops_per_image"], achieved_flop_per_s=ips * m["flops_per_image"],
        matmul_flop_per_s=limit_flops, image_size=m["image_size"], dim=m["dim"],
        seconds_at_scale=n / ips, scale_rows=n,
        process_peak_rss_bytes=m["process_peak_rss_bytes"],
        peak_device_memory_bytes=m.get("peak_device_memory_bytes"))]
    for p in raw["pipeline"]:
        pips = p["images"] / p["seconds"]
        out.append(record(
            "embed", scale, variant=f"{p['model']} pipeline encode n={p['images']} "
                                    f"({p['device']}, batch {p['batch']})",
            seconds=p["seconds"], peak_memory_bytes=p["peak_memory_bytes"], throughput=pips,
            throughput_unit="images/s", limit=bound,
            limit_kind="matmul FLOP/s / model FLOPs per image",
            images=p["images"], seconds_at_scale=n / pips, scale_rows=n,
            # A few dozen images: the peak is the batch working set (activations), which
            # the memory check below shows to be constant; no ratio to the tiny arrays.
            working_set_bytes=p["peak_memory_bytes"] - p["array_bytes"],
            process_peak_rss_bytes=p["process_peak_rss_bytes"]))
    checks = sorted(raw.get("memory", []), key=lambda p: p["images"])
    for p in checks:
        overhead = p["peak_memory_bytes"] - p["array_bytes"]
        extra: dict[str, Any] = {}
        if p is checks[-1] and len(checks) > 1:
            a = checks[0]
            over_a = a["peak_memory_bytes"] - a["array_bytes"]
            extra["memory_growth_bytes_per_image"] = (overhead - over_a) / (p["images"] - a["images"])
            extra["growth_bytes_at_scale"] = extra["memory_growth_bytes_per_image"] * n
        out.append(record(
            "embed", scale, variant=f"memory check: {p['model']} pipeline encode "
                                    f"n={p['images']} ({p['device']}, batch {p['batch']})",
            seconds=p["seconds"], peak_memory_bytes=p["peak_memory_bytes"],
            throughput=p["images"] / p["seconds"], throughput_unit="images/s",
            array_bytes=p["array_bytes"], images=p["images"], overhead_bytes=overhead,
            image_bytes=p.get("image_bytes"),
            process_peak_rss_bytes=p["process_peak_rss_bytes"], **extra))
    return out
