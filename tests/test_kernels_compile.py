"""Every kernel, at every configuration the dispatcher can pick, compiles for sm_80 and sm_90
without a GPU, and the cubin spills nothing and fits in 255 registers (cuobjdump)."""
from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from fastcal.kernels import predict, prototypes, stats

from benchmarks import aot

CAPABILITIES = [80, 90]
LOGIT_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# NCHW has contiguous pixels (stride 1 is specialised by the JIT), channels_last contiguous classes
LAYOUTS = {"nchw": "s_l", "channels_last": "s_c"}
SCALARS = ["C", "L", "O1", "O2", "so0", "so1", "so2", "s_l", "s_c", "n_tiles", "C_PAD", "H_UP", "W_UP", "P_IMG"]
CLASS_COUNTS = range(2, 1025)  # above 64 classes the configuration no longer changes


def dispatcher_configs(config_of, element_size):
    """Every distinct conservative launch configuration ``config_of`` returns for logits of
    ``element_size`` bytes: what any launch may get. The pipelined configurations of aligned NCHW
    launches are compiled with the JIT's specialisations in tests/test_bandwidth_model.py."""
    return {tuple(sorted(config_of(c, element_size, False).items())): config_of(c, element_size, False)
            for c in CLASS_COUNTS}.values()


def launch_options(config: dict, upsample: bool = False) -> dict:
    """As the launchers pass them: upsampling launches are not pipelined."""
    options = {key: config[key] for key in ("num_warps", "num_stages", "maxnreg")}
    return {**options, "num_stages": 1} if upsample else options


def upsamples(layout):
    """Bilinear upsampling reads NCHW logits from the model's output (s_l = 1 still holds: the
    launcher passes 1 there, unused)."""
    return (False, True) if layout == "nchw" else (False,)


ELEMENT_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}


def cases():
    for dtype, layout, cap in itertools.product(LOGIT_TYPES, LAYOUTS, CAPABILITIES):
        for config in dispatcher_configs(stats.stats_config, ELEMENT_SIZES[dtype]):
            meta = {"C_BLOCK": config["C_BLOCK"], "PIX_BLOCK": config["PIX_BLOCK"]}
            tag = f"{dtype}-{layout}-sm{cap}-C{config['C_BLOCK']}{'' if config['FUSED'] else '-chunked'}"
            for has_valid, partials, upsample in itertools.product([False, True], [False, True], upsamples(layout)):
                sums = "*fp32" if partials else "*fp64"
                # the confidence power's variant with the mask and the partials, the most registers
                for powered in (False, True) if has_valid and partials else (False,):
                    yield (f"stats-{tag}-valid{int(has_valid)}-partials{int(partials)}-up{int(upsample)}"
                           f"{'-powered' if powered else ''}",
                           "stats._stats_kernel", dtype, layout, cap, {"S_ptr": sums, "W_ptr": sums, "N_ptr": sums},
                           {**meta, "HAS_VALID": has_valid, "FUSED": config["FUSED"], "PARTIALS": partials,
                            "UPSAMPLE": upsample, "POWERED": powered}, launch_options(config, upsample))
            if not config["FUSED"]:
                row_options = {**launch_options(config), "num_warps": stats.ROW_STATS["num_warps"],
                               "num_stages": stats.ROW_STATS["num_stages"]}
                for has_valid, upsample in itertools.product([False, True], upsamples(layout)):
                    yield (f"row_stats-{tag}-valid{int(has_valid)}-up{int(upsample)}", "stats._row_stats_kernel",
                           dtype, layout, cap, {},
                           {"C_BLOCK": config["C_BLOCK"], "PIX_BLOCK": config["ROW_PIX_BLOCK"],
                            "HAS_VALID": has_valid, "UPSAMPLE": upsample}, row_options)
        for config in dispatcher_configs(predict.predict_config, ELEMENT_SIZES[dtype]):
            meta = {"C_BLOCK": config["C_BLOCK"], "PIX_BLOCK": config["PIX_BLOCK"], "FUSED": config["FUSED"]}
            tag = f"{dtype}-{layout}-sm{cap}-C{config['C_BLOCK']}{'' if config['FUSED'] else '-chunked'}"
            for label, upsample in itertools.product(("i64", "i32", "u8", "scores"), upsamples(layout)):
                out = "*fp32" if label == "scores" else f"*{label}"
                yield (f"predict-{tag}-{label}-up{int(upsample)}", "predict._predict_kernel", dtype, layout, cap,
                       {"out_ptr": out}, {**meta, "UPSAMPLE": upsample, "SCORES": label == "scores"},
                       launch_options(config, upsample))
    # the operands between the passes of calibrate: one block of the fused predict pass, float64 sums
    for cap, c_block, skip in itertools.product(CAPABILITIES, (16, 32, 64), (False, True)):
        launch, *_ = prototypes.operands_launch(*_meta_sums(c_block), skip, c_block)
        yield (f"operands-sm{cap}-C{c_block}-skip{int(skip)}", "prototypes._operands_kernel", "fp32", "none", cap,
               {"S_ptr": "*fp64", "W_ptr": "*fp64", "P_ptr": "*fp32"}, dict(launch.constexprs), dict(launch.options))


def _meta_sums(num_classes: int):
    import torch

    return (torch.empty(num_classes, num_classes, dtype=torch.float64, device="meta"),
            torch.empty(num_classes, dtype=torch.float64, device="meta"))


KERNELS = {"stats._stats_kernel": stats._stats_kernel, "stats._row_stats_kernel": stats._row_stats_kernel,
           "predict._predict_kernel": predict._predict_kernel, "prototypes._operands_kernel": prototypes._operands_kernel}


def compile_case(case):
    name, kernel_name, dtype, layout, cap, extra, meta, options = case
    kernel = KERNELS[kernel_name]
    unit_stride = LAYOUTS.get(layout)  # "none": a kernel that walks no pixels
    types = {"z_ptr": LOGIT_TYPES[dtype], "valid_ptr": "*u8", "max_ptr": "*fp32", "conf_ptr": "*fp32",
             "cls_ptr": "*i32", "bad_ptr": "*i32", "A_ptr": "*fp32", "centre_ptr": "*fp32", "bias_ptr": "*fp32",
             "off_ptr": "*i64", "wgt_ptr": "*fp32",
             "scale": "fp32", "power": "fp32",
             **{s: "i32" for s in SCALARS}, **extra}
    sig = {arg: types[arg] for arg in kernel.arg_names if arg not in meta and arg != unit_stride}
    constants = {unit_stride: 1, **meta} if unit_stride in kernel.arg_names else dict(meta)
    compiled = aot.compile_kernel(kernel, sig, constants, cap, options)
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
        results = dict(pool.map(compile_case, ALL_CASES))
    print("\nkernel registers and spills (cuobjdump --dump-resource-usage):")
    for name, u in sorted(results.items()):
        print(f"  {name:60s} REG:{u['REG']:3d} STACK:{u['STACK']} LOCAL:{u['LOCAL']}")
    return results


@pytest.mark.parametrize("name", [c[0] for c in ALL_CASES])
def test_compiles_without_spills(usage, name):
    u = usage[name]
    assert u["LOCAL"] == 0 and u["STACK"] == 0, f"{name} spills: {u}"
    assert u["REG"] <= 255, f"{name} uses {u['REG']} registers"
