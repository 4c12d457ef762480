"""Every kernel, at every configuration the dispatcher can pick, compiles for every target of
``kernels/configs.py`` (sm_90, gfx942, sm_80, gfx90a) without a GPU, with no register spills:
for NVIDIA the cubin spills nothing and fits in 255 registers (cuobjdump); for AMD the code
object's metadata shows no VGPR spilled and no scratch memory, and at most 512 VGPRs (with
AGPRs). A few AMD variants park scalar registers in VGPR lanes (``.sgpr_spill_count``), which
costs no memory traffic.

Each target and each launch configuration (class block, pixel block, warps, stages, dot
precision) is compiled. The remaining choices (logit dtype, memory layout, mask, partial sums,
upsampling, confidence power) are covered pairwise on the two primary targets, H100/H200 (sm_90)
and MI300 (gfx942): every pair of values of two choices is compiled together at least once for
each configuration; the predict kernel's output (int64, int32 or uint8 labels, or float32 scores),
which changes only its final store, is cycled through those cases so that each appears for each
configuration. The secondary targets, A100 (sm_80) and MI250 (gfx90a), share the primary targets'
tables: there each configuration is compiled once (its register use is the table's, which the primary
targets check choice by choice). ``FASTCAL_AOT_SWEEP=values`` compiles every value of every choice
on the secondary targets, ``FASTCAL_AOT_SWEEP=pairwise`` every pair (more compiles, see
docs/tests.md). Registers depend on the configuration and, within it, on a choice or two at a time;
compile time grows with the number of cases.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from benchmarks import aot
from fastcal.kernels import predict, prototypes, stats
from fastcal.kernels.configs import TARGETS

LOGIT_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# NCHW has contiguous pixels (stride 1 is specialised by the JIT), channels_last contiguous classes
LAYOUTS = {"nchw": "s_l", "channels_last": "s_c"}
SCALARS = ["C", "L", "O1", "O2", "so0", "so1", "so2", "s_l", "s_c", "n_tiles", "C_PAD", "H_UP", "W_UP", "P_IMG"]
CLASS_COUNTS = range(2, 1025)  # above 64 classes the configuration no longer changes
ELEMENT_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}
OUTPUTS = ["i64", "scores", "i32", "u8"]
PRIMARY_TARGETS = ("sm_90", "gfx942")  # the others share their tables
COVERING_TRIES = 200  # shuffled greedy orders tried after the product order
# on the secondary targets: 2 every pair of choices, 1 every value, 0 one case per configuration (the default)
SECONDARY_STRENGTH = {"pairwise": 2, "values": 1}.get(os.environ.get("FASTCAL_AOT_SWEEP", ""), 0)


def covering(allowed=lambda case: True, strength=2, **choices) -> list[dict]:
    """A few cases (dicts of one value per choice, ``allowed`` ones only) holding every combination
    of values of ``strength`` choices (2: every pair; 1: every value; 0: one case) that some allowed
    case holds.
    Greedy, the case covering the most combinations not yet covered first, over the product order
    and a few fixed shuffles of it; the shortest list wins (the same list on every run)."""
    names = list(choices)
    every = [dict(zip(names, values)) for values in itertools.product(*choices.values())]
    every = [case for case in every if allowed(case)]
    held = [{tuple((name, case[name]) for name in group) for group in itertools.combinations(names, strength)}
            for case in every]
    shuffle = random.Random(0)
    best = None
    for order in [range(len(every))] + [shuffle.sample(range(len(every)), len(every)) for _ in range(COVERING_TRIES)]:
        needed, chosen = set().union(*held), []
        while needed:
            pick = max(order, key=lambda i: len(held[i] & needed))
            chosen.append(every[pick])
            needed -= held[pick]
        if best is None or len(chosen) < len(best):
            best = chosen
    return best


def strength(target: str) -> int:
    return 2 if target in PRIMARY_TARGETS else SECONDARY_STRENGTH


def dispatcher_configs(config_of, target):
    """Every distinct conservative launch configuration ``config_of`` returns on ``target``: what
    any launch may get. The pipelined configurations of aligned NCHW launches are compiled with
    the JIT's specialisations in tests/test_bandwidth_model.py."""
    configs = (config_of(c, size, False, target) for c in CLASS_COUNTS for size in (4, 2))
    return {tuple(sorted(config.items())): config for config in configs}.values()


def launch_options(config: dict, target: str, upsample: bool = False) -> dict:
    """As the launchers pass them: upsampling launches take the table's pipeline depth for them."""
    options = {key: config[key] for key in ("num_warps", "num_stages", "maxnreg")}
    return {**options, "num_stages": TARGETS[target].upsample_num_stages} if upsample else options


def nchw_only_upsamples(case) -> bool:
    """Bilinear upsampling reads NCHW logits from the model's output (s_l = 1 still holds); the
    confidence power has no meaning at the temperature limit (the launcher never asks for both)."""
    return (case["layout"] == "nchw" or not case.get("upsample")) and not (case.get("limit") and case.get("powered"))


def cases():
    for target in TARGETS:
        for config in dispatcher_configs(stats.stats_config, target):
            meta = {"C_BLOCK": config["C_BLOCK"], "PIX_BLOCK": config["PIX_BLOCK"], "FUSED": config["FUSED"],
                    "DOT_PRECISION": config["DOT_PRECISION"]}
            tag = f"{target}-C{config['C_BLOCK']}{'' if config['FUSED'] else '-chunked'}-w{config['num_warps']}"
            for c in covering(nchw_only_upsamples, strength(target), dtype=list(LOGIT_TYPES), layout=list(LAYOUTS),
                              valid=[False, True], partials=[False, True], upsample=[False, True],
                              powered=[False, True], limit=[False, True]):
                sums = "*fp32" if c["partials"] else "*fp64"
                yield (f"stats-{tag}-{c['dtype']}-{c['layout']}-valid{int(c['valid'])}-partials{int(c['partials'])}"
                       f"-up{int(c['upsample'])}-powered{int(c['powered'])}-limit{int(c['limit'])}",
                       "stats._stats_kernel", c["dtype"], c["layout"], target,
                       {"S_ptr": sums, "W_ptr": sums, "N_ptr": sums},
                       {**meta, "HAS_VALID": c["valid"], "PARTIALS": c["partials"], "UPSAMPLE": c["upsample"],
                        "POWERED": c["powered"], "LIMIT": c["limit"]}, launch_options(config, target, c["upsample"]))
            if not config["FUSED"]:
                row_options = {**launch_options(config, target), "num_warps": config["row_num_warps"],
                               "num_stages": config["row_num_stages"], "maxnreg": config["row_maxnreg"]}
                for c in covering(nchw_only_upsamples, strength(target), dtype=list(LOGIT_TYPES),
                                  layout=list(LAYOUTS), valid=[False, True], upsample=[False, True],
                                  limit=[False, True]):
                    yield (f"row_stats-{tag}-{c['dtype']}-{c['layout']}-valid{int(c['valid'])}-up{int(c['upsample'])}"
                           f"-limit{int(c['limit'])}",
                           "stats._row_stats_kernel", c["dtype"], c["layout"], target, {},
                           {"C_BLOCK": config["C_BLOCK"], "PIX_BLOCK": config["ROW_PIX_BLOCK"],
                            "HAS_VALID": c["valid"], "UPSAMPLE": c["upsample"], "LIMIT": c["limit"]}, row_options)
        for config in dispatcher_configs(predict.predict_config, target):
            meta = {"C_BLOCK": config["C_BLOCK"], "PIX_BLOCK": config["PIX_BLOCK"], "FUSED": config["FUSED"],
                    "DOT_PRECISION": config["DOT_PRECISION"]}
            tag = f"{target}-C{config['C_BLOCK']}{'' if config['FUSED'] else '-chunked'}"
            # the output (a label type, or the scores) changes the final store only: cycled through the
            # pairwise cases, one more choice in the others
            outputs = {} if strength(target) == 2 else {"out": OUTPUTS}
            for i, c in enumerate(covering(nchw_only_upsamples, strength(target), dtype=list(LOGIT_TYPES),
                                           layout=list(LAYOUTS), upsample=[False, True], limit=[False, True],
                                           **outputs)):
                c = {"out": OUTPUTS[i % len(OUTPUTS)], **c}
                out = "*fp32" if c["out"] == "scores" else f"*{c['out']}"
                yield (f"predict-{tag}-{c['dtype']}-{c['layout']}-{c['out']}-up{int(c['upsample'])}"
                       f"-limit{int(c['limit'])}",
                       "predict._predict_kernel", c["dtype"], c["layout"], target, {"out_ptr": out},
                       {**meta, "UPSAMPLE": c["upsample"], "SCORES": c["out"] == "scores", "LIMIT": c["limit"]},
                       launch_options(config, target, c["upsample"]))
        # the operands between the passes of calibrate: one block of the fused predict pass, float64 sums
        operand_cases = itertools.product((16, 32, 64), (False, True)) if strength(target) > 0 \
            else zip((16, 32, 64), (False, True, False))  # one case per class block on the secondary targets
        for c_block, skip in operand_cases:
            launch, *_ = prototypes.operands_launch(*_meta_sums(c_block), skip, c_block, target)
            yield (f"operands-{target}-C{c_block}-skip{int(skip)}", "prototypes._operands_kernel", "fp32", "none",
                   target, {"S_ptr": "*fp64", "W_ptr": "*fp64", "P_ptr": "*fp32"}, dict(launch.constexprs),
                   dict(launch.options))


def _meta_sums(num_classes: int):
    import torch

    return (torch.empty(num_classes, num_classes, dtype=torch.float64, device="meta"),
            torch.empty(num_classes, dtype=torch.float64, device="meta"))


KERNELS = {"stats._stats_kernel": stats._stats_kernel, "stats._row_stats_kernel": stats._row_stats_kernel,
           "predict._predict_kernel": predict._predict_kernel,
           "prototypes._operands_kernel": prototypes._operands_kernel}


def compile_case(case):
    name, kernel_name, dtype, layout, target, extra, meta, options = case
    kernel = KERNELS[kernel_name]
    unit_stride = LAYOUTS.get(layout)  # "none": a kernel that walks no pixels
    types = {"z_ptr": LOGIT_TYPES[dtype], "valid_ptr": "*u8", "max_ptr": "*fp32", "conf_ptr": "*fp32",
             "cls_ptr": "*i32", "bad_ptr": "*i32", "A_ptr": "*fp32", "centre_ptr": "*fp32", "bias_ptr": "*fp32",
             "off_ptr": "*i64", "wgt_ptr": "*fp32",
             "scale": "fp32", "power": "fp32",
             **{s: "i32" for s in SCALARS}, **extra}
    sig = {arg: types[arg] for arg in kernel.arg_names if arg not in meta and arg != unit_stride}
    constants = {unit_stride: 1, **meta} if unit_stride in kernel.arg_names else dict(meta)
    compiled = aot.compile_kernel(kernel, sig, constants, target, options)
    return name, aot.resource_usage(compiled)


ALL_CASES = list(cases())


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def usage(monkeypatch_module):
    # Fresh processes without TRITON_INTERPRET import the kernels as real JIT functions.
    monkeypatch_module.delenv("TRITON_INTERPRET", raising=False)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        results = dict(pool.map(compile_case, ALL_CASES, chunksize=4))
    print("\nkernel registers and spills (cuobjdump --dump-resource-usage; AMDGCN metadata):")
    for name, u in sorted(results.items()):
        print(f"  {name:70s} REG:{u['REG']:3d} STACK:{u['STACK']} LOCAL:{u['LOCAL']}")
    return results


def test_every_target_and_configuration_is_compiled():
    names = [case[0] for case in ALL_CASES]
    assert len(names) == len(set(names))
    for target in (t for t in TARGETS if strength(t) > 0):
        for config in dispatcher_configs(predict.predict_config, target):
            tag = f"predict-{target}-C{config['C_BLOCK']}{'' if config['FUSED'] else '-chunked'}-"
            assert {n.split("-")[-3] for n in names if n.startswith(tag)} == set(OUTPUTS), tag
    for target in TARGETS:
        for prefix in ("stats-", "row_stats-", "predict-", "operands-"):
            assert any(n.startswith(f"{prefix}{target}-") for n in names), (prefix, target)


def test_covering_covers_every_pair_and_every_value():
    chosen = covering(nchw_only_upsamples, dtype=list(LOGIT_TYPES), layout=list(LAYOUTS), upsample=[False, True],
                      valid=[False, True])
    for a, b in itertools.combinations(["dtype", "layout", "upsample", "valid"], 2):
        possible = {(x[a], x[b]) for x in [dict(zip(["dtype", "layout", "upsample", "valid"], v)) for v in
                    itertools.product(LOGIT_TYPES, LAYOUTS, [False, True], [False, True])] if nchw_only_upsamples(x)}
        assert {(x[a], x[b]) for x in chosen} == possible
    assert not any(x["upsample"] and x["layout"] != "nchw" for x in chosen)
    singles = covering(nchw_only_upsamples, 1, dtype=list(LOGIT_TYPES), layout=list(LAYOUTS), out=OUTPUTS)
    assert len(singles) == len(OUTPUTS)
    for name, values in (("dtype", LOGIT_TYPES), ("layout", LAYOUTS), ("out", OUTPUTS)):
        assert {x[name] for x in singles} == set(values)


@pytest.mark.parametrize("name", [c[0] for c in ALL_CASES])
def test_compiles_without_spills(usage, name):
    u = usage[name]
    limit = 255 if "-sm_" in name else 512
    assert u["LOCAL"] == 0 and u["STACK"] == 0, f"{name} spills: {u}"
    assert u["REG"] <= limit, f"{name} uses {u['REG']} registers"
