"""Checks an installed obd_ext wheel from outside the source tree: every module
is there and imports, the extension is stripped, the torch requirement is the
build's, and the main calls work. Usage: wheel_smoke.py REPO WHEEL"""

import importlib
import importlib.metadata
import os
import pkgutil
import sys
import zipfile

repo, wheel = sys.argv[1], sys.argv[2]
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import obd_ext  # noqa: E402

installed = os.path.dirname(obd_ext.__file__)
assert not installed.startswith(os.path.abspath(repo)), f"imported the source tree, not the wheel: {installed}"

# Every module of the source tree is in the wheel and imports (optional extras may be absent).
source = [os.path.relpath(os.path.join(d, f), repo) for d, _, fs in os.walk(os.path.join(repo, "obd_ext"))
          for f in fs if f.endswith(".py")]
names = set(zipfile.ZipFile(wheel).namelist())
missing = sorted(p for p in source if p not in names)
assert not missing, f"modules missing from the wheel: {missing}"
OPTIONAL = {"matplotlib", "transformers", "sklearn", "tokenizers", "safetensors"}
for m in pkgutil.walk_packages(obd_ext.__path__, "obd_ext."):
    if m.name == "obd_ext.__main__":  # runs the CLI on import; check_wheel.sh runs it as a command
        continue
    try:
        importlib.import_module(m.name)
    except ImportError as e:  # only an optional extra may be missing
        assert e.name and e.name.split(".")[0] in OPTIONAL, f"{m.name}: {e!r}"
        print(f"  {m.name}: needs the optional {e.name}")

# The extension carries no debug info, and the requirement pins the build's torch.
so = [f for f in os.listdir(installed) if f.startswith("_C") and f.endswith(".so")]
size = os.path.getsize(os.path.join(installed, so[0]))
assert size < 12 * 2**20, f"_C is {size / 2**20:.1f} MiB: debug info not stripped?"
major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
reqs = importlib.metadata.requires("obd_ext")
assert f"torch=={major_minor}.*" in reqs, reqs

# The main calls, end to end.
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
h = obd_ext.hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
pruner = obd_ext.Pruner(model)
sel = pruner.prune(0.5, method="obd", curvature=h)
assert sel.deleted_now == round(0.5 * (35 + 21)), sel
pruner.finalize()
assert obd_ext.has_cuda_kernels() == torch.cuda.is_available() or not torch.cuda.is_available()
print(f"wheel ok: {os.path.basename(wheel)}, _C {size / 2**20:.1f} MiB, requires {reqs}, {pruner}")
