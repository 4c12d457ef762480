import sys, os, multiprocessing
from concurrent.futures import ProcessPoolExecutor
import test_kernels_compile as t
if __name__ == "__main__":
    pats = sys.argv[1:]
    cases = [c for c in t.ALL_CASES if all(p in c[0] for p in pats)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, u in pool.map(t.compile_case, cases):
            print(name, u["REG"], u["STACK"])
