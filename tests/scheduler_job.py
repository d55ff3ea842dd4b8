"""A small OBD scheduler run, used by test_scheduler.py in a subprocess (it gets SIGKILLed).

Usage: python tests/scheduler_job.py CHECKPOINT RESULT [SLEEP_PER_ROUND]
"""

import sys
import time

import torch
import torch.nn as nn

import obd_ext
from obd_ext.scheduler import OBDScheduler, fixed


def main() -> None:
    checkpoint, result = sys.argv[1], sys.argv[2]
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def train(r: int) -> None:
        for _ in range(20):
            idx = torch.randperm(64)[:32]  # uses the RNG the checkpoint restores
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        time.sleep(pause)

    sched = OBDScheduler(model, loss_fn, (x, y), train, fixed(0.3, 5), optimizer=opt, method="obd",
                         checkpoint=checkpoint, progress=False)
    sched.run()
    torch.save({"model": model.state_dict(), "masks": sched.pruner.state_dict(), "log": sched.log}, result)
    assert obd_ext.__version__


if __name__ == "__main__":
    main()
