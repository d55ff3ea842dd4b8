"""The paper's experiment (LeCun, Denker & Solla, 1989, section 2.3) on the
handwritten digits bundled with scikit-learn, averaged over several seeds.

A small constrained (weight-shared convolutional) network of scaled tanh
units, f(a) = 1.7159 tanh(2a/3), trained with MSE to +-1 targets (inside the
range of f, so that the objective has a minimum at finite weights), then, per
seed:

- Figure 1a: training MSE (dB) against parameters remaining, deleting without
  retraining in order of OBD saliency (in small steps, the curvature of eq. 7
  recomputed on the pruned network before each step; "obd_static" is the
  one-shot order of the trained network), of magnitude, and at random (mean
  of several draws);
- Figure 1b: the objective OBD predicts (the trained objective plus the
  saliencies of the deleted parameters, summed over the steps) against the
  actual one along the OBD order;
- Figure 2: training and test MSE (dB) and test accuracy against parameters
  remaining, for iterative deletion with retraining (OBDScheduler with
  --method and --schedule) and for the OBD deletions without retraining.

Curves are averaged over the seeds in dB (the mean of 10 log10 MSE, i.e. the
geometric mean of the MSE: the claims are stated in dB); accuracies are
arithmetic means. The claims check compares the means with the paper's four
claims and prints PASS or FAIL for each, with the measured value and its
threshold. A claim the run cannot establish is printed as SKIP with the
reason, never as FAIL: --quick trains 800 epochs instead of 1500, so it skips
the first claim (OBD at least 1 dB below magnitude), which holds only for a
network trained to its minimum, and checks the other three.

Writes fig1a.png, fig1b.png, fig2.png (means, with the per-seed range
shaded), results.json (means under the original keys, per-seed curves under
"per_seed", the claims check under "claims"), the saliency report of the
first seed's trained network (saliency_report.json, saliency_layers.png,
saliency_units.png) and that seed's scheduler rounds (rounds.png) into --out,
and prints the report, a summary table and the claims check.
"""

from ..models import ScaledTanh, constrained_net
from .arguments import add_arguments
from .claims import CLAIMS, check_claims, format_claims
from .config import DEFAULTS, METHODS, QUICK, SCHEDULES, resolve_config
from .data import load_data
from .experiment import aggregate, level_grid, run_seed
from .figures import FIGURES, plot_figures
from .run import run_demo, run_from_args
from .summary import format_summary

__all__ = [
    "run_demo",
    "run_from_args",
    "add_arguments",
    "DEFAULTS",
    "QUICK",
    "METHODS",
    "SCHEDULES",
    "resolve_config",
    "CLAIMS",
    "check_claims",
    "format_claims",
    "load_data",
    "level_grid",
    "run_seed",
    "aggregate",
    "FIGURES",
    "plot_figures",
    "format_summary",
    "ScaledTanh",
    "constrained_net",
]
