"""examples/quickstart.py runs, uses the library's calls, and prints what its docstring says it prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(-?[0-9.]+e[+-][0-9]+)"


def test_quickstart_runs_and_its_numbers_mean_what_it_says():
    # One thread: the example is small, and more threads only fight the other jobs of a loaded CI machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("dense: objective ") and "pruning the 2368 weights of ['0.weight', '2.weight']" in out
    dense_acc = float(re.search(r"test acc ([0-9.]+); pruning", out).group(1))
    assert dense_acc > 0.95
    # One weight at a time: the quadratic model's own regime; "lm" (Gauss-Newton) 1.0-1.8x, median about 1.4.
    single = re.findall(rf"saliency rank +(\d+)%: predicted {NUMBER}, measured {NUMBER}", out)
    assert [q for q, _, _ in single] == ["50", "90", "99", "100"]
    for q, predicted, measured in single:
        assert 0.8 < float(measured) / float(predicted) < 2.5, (q, predicted, measured)
    median, low, high = (float(v) for v in re.search(
        r"measured / predicted over the 51 weights from the median to the largest saliency: median ([0-9.]+), "
        r"80% of them within ([0-9.]+)-([0-9.]+)", out).groups())
    assert 1.0 < median < 1.8 and 0.8 < low <= median <= high < 2.2, (median, low, high)
    # Many at once: close at 30%, several times the prediction at 70% (the cross terms OBD leaves out).
    table = {int(s): (float(p), float(m)) for s, p, m in
             re.findall(rf"sparsity +(\d+)%: predicted {NUMBER}, measured {NUMBER}", out)}
    assert sorted(table) == [10, 30, 50, 70]
    assert 0.9 < table[30][1] / table[30][0] < 1.8, table[30]
    assert table[70][1] > 2.5 * table[70][0] and table[70][1] > table[50][1] > table[30][1], table
    assert abs(table[10][1]) < 1e-6  # mostly the blank border pixels' weights: nothing measurable
    # Pruned in rounds, retrained with the deleted weights frozen, finalized: exactly 70% zeros, accuracy kept.
    pruned = re.findall(r"pruned by +(\w+) in 3 rounds of 10 retraining epochs: objective ([0-9.]+), test acc "
                        r"([0-9.]+) \(dense [0-9.]+\); finalized with (\d+) of 2368 weights zero", out)
    assert [m for m, *_ in pruned] == ["lm", "magnitude"], out[-2000:]
    for method, _, acc, zeros in pruned:
        assert int(zeros) == round(0.7 * 2368), method
        assert float(acc) > dense_acc - 0.02, (method, acc, dense_acc)


def test_quickstart_uses_the_library_not_hand_rolled_curvature():
    src = (ROOT / "examples" / "quickstart.py").read_text()
    for call in ("obd_ext.hessian_diag(", "obd_ext.Pruner(", ".prune(", ".attach(", ".finalize()"):
        assert call in src, call
    assert "torch.func" not in src and "vmap" not in src
