"""How hessian_diag takes its data: batches, one pair, or a clear error for what is not batches."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import obd_ext


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,))
    return model, x, y


@pytest.mark.parametrize("method", ["obd", "lm", "fisher", "exact"])
def test_dataset_of_single_samples_is_an_error_that_says_how_to_batch(method):
    model, x, y = _problem()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"data: got a TensorDataset.*single samples.*DataLoader"):
        obd_ext.hessian_diag(model, nn.CrossEntropyLoss(), TensorDataset(x, y), method=method, progress=False)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("method", ["obd", "fisher"])
def test_dataloader_over_the_dataset_equals_the_batches(method):
    model, x, y = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    got = obd_ext.hessian_diag(model, nn.CrossEntropyLoss(), loader, method=method, progress=False)
    want = obd_ext.hessian_diag(model, nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])], method=method,
                                progress=False)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_a_lone_tensor_is_not_batches():
    model, x, _ = _problem()
    with pytest.raises(TypeError, match=r"data: got a single tensor of shape \(10, 4\)"):
        obd_ext.hessian_diag(model, nn.CrossEntropyLoss(), x, progress=False)


def test_swapped_loss_and_data_name_the_order():
    model, x, y = _problem()
    with pytest.raises(TypeError, match=r"loss_fn: expected a callable loss.*got a tuple.*hessian_diag\(model, loss_fn, data"):
        obd_ext.hessian_diag(model, (x, y), nn.CrossEntropyLoss(), progress=False)
