"""Export sizes: every zoo model, magnitude-pruned (global) to the given sparsities, saved as Ladle stores it
(dense safetensors: fp32 state + bool mask + metadata) and exported as `sparse` (workers.export) and `onnx`;
prints the bytes of each, the sparse file's ratio to the dense file and to the fp32 state alone, the layouts
chosen, and the seconds to encode and to load back (checked equal). Inputs as the zoo is used here: mlp and
lenet5 on 1x28x28 (Fashion-MNIST), the ResNets and VGG16-BN on 3x32x32 (CIFAR), 10 classes; randomly
initialised weights (the sizes depend on how many weights each layer keeps, not on their values), with the
biases and BatchNorm tensors nudged off their initial values (equal tensors would be stored once).

With --llm, also a causal LM of SmolLM2-135M's shape (LLaMA: 30 blocks of width 576, vocabulary 49152,
tied embeddings; randomly initialised, nothing downloaded) with its blocks' linear weights magnitude-pruned
per tensor to 50 % and to 2:4, as LM jobs prune (the embeddings and head are not pruned).

    .venv/bin/python bench/export_sizes.py [--sparsity 0.9 0.5] [--no-onnx] [--llm]
"""

from __future__ import annotations

import argparse
import time

import torch

from workers.checkpoint import Checkpoint, to_bytes
from workers.export import from_sparse_bytes, onnx_bytes, sparse_sizes, to_sparse_bytes
from workers.models import ZOO, build_model
from workers.pruning import full_masks, prune

SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28)}


def measure(arch: str, sparsity: float, with_onnx: bool) -> dict:
    torch.manual_seed(0)
    shape = SHAPES.get(arch, (3, 32, 32))
    model = build_model(arch, num_classes=10, in_shape=shape)
    r = prune(model, full_masks(model), sparsity, scope="global", criterion="magnitude", seed=0)
    ckpt = Checkpoint(state={k: v.detach().clone() for k, v in r.model.state_dict().items()}, masks=r.masks,
                      meta={"arch": arch, "num_classes": 10, "in_shape": list(shape), "model_kwargs": {}})
    for name, t in ckpt.state.items():       # biases and BatchNorm tensors as training leaves them: all different
        if name not in ckpt.masks and t.is_floating_point():
            t.add_(1e-3 * torch.rand_like(t))
    dense = to_bytes(ckpt)
    start = time.perf_counter()
    sparse = to_sparse_bytes(ckpt)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    back = from_sparse_bytes(sparse)
    decode = time.perf_counter() - start
    assert all(torch.equal(back.state[k], v) for k, v in ckpt.state.items())
    state = sum(t.numel() * t.element_size() for t in ckpt.state.values())
    return {"arch": arch, "sparsity": sparsity, "weights": sum(m.numel() for m in ckpt.masks.values()),
            "dense": len(dense), "sparse": len(sparse), "ratio": len(sparse) / len(dense),
            "of_state": len(sparse) / state,
            "onnx": len(onnx_bytes(ckpt)) if with_onnx else None, "layouts": sparse_sizes(ckpt),
            "encode": encode, "decode": decode}


def measure_llm(pattern: str) -> dict:
    """A SmolLM2-135M-shaped LLaMA, its blocks' linear weights pruned to 50 % (`unstructured` per tensor or
    `2:4` along the inputs), dense file against sparse file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.lm.prune import prunable_lm_names
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    params = dict(model.named_parameters())
    masks = {}
    with torch.no_grad():
        for name in prunable_lm_names(model):
            w = params[name]
            if pattern == "2:4":
                groups = w.abs().reshape(-1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
                masks[name] = keep.reshape(w.shape)
            else:
                masks[name] = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
            w.mul_(masks[name])
    ckpt = Checkpoint(state={k: v.detach().clone() for k, v in model.state_dict().items()}, masks=masks,
                      meta={"arch": "hf:smollm2-135m-shaped", "task": "causal_lm"})
    del model, params
    dense = len(to_bytes(ckpt))
    start = time.perf_counter()
    sparse = to_sparse_bytes(ckpt)
    encode = time.perf_counter() - start
    state = sum(t.numel() * t.element_size() for t in ckpt.state.values())
    return {"pattern": pattern, "weights": sum(m.numel() for m in masks.values()), "dense": dense,
            "sparse": len(sparse), "ratio": len(sparse) / dense, "of_state": len(sparse) / state, "encode": encode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.5])
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--llm", action="store_true", help="also a SmolLM2-135M-shaped LM at 50 %% and 2:4")
    args = ap.parse_args()
    print(f"{'model':9} {'sparsity':>8} {'weights':>10} {'dense':>11} {'sparse':>11} {'sparse/dense':>12} "
          f"{'/fp32 state':>11} {'onnx':>11}  layouts (bitmask/csr/dense)  encode, load s")
    for sparsity in args.sparsity:
        for arch in ZOO:
            m = measure(arch, sparsity, not args.no_onnx)
            lay = m["layouts"]
            print(f"{arch:9} {sparsity:8.2f} {m['weights']:10,} {m['dense']:11,} {m['sparse']:11,} {m['ratio']:12.3f} "
                  f"{m['of_state']:11.3f} {m['onnx'] or 0:11,}  {lay['bitmask']:3}/{lay['csr']:3}/{lay['dense']:3}"
                  f"                  {m['encode']:.2f}, {m['decode']:.2f}", flush=True)
    if args.llm:
        print(f"\n{'LM (SmolLM2-135M shape)':24} {'pruned weights':>14} {'dense':>12} {'sparse':>12} {'sparse/dense':>12} "
              f"{'/fp32 state':>11}  encode s")
        for pattern in ("unstructured", "2:4"):
            m = measure_llm(pattern)
            print(f"{'50 % ' + pattern:24} {m['weights']:14,} {m['dense']:12,} {m['sparse']:12,} {m['ratio']:12.3f} "
                  f"{m['of_state']:11.3f}  {m['encode']:.1f}", flush=True)


if __name__ == "__main__":
    main()
