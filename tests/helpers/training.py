"""Parameter snapshots, to compare what training did to a model, and one micro-batch's loss and gradients."""

import torch


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def loss_and_gradients(trainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One collated micro-batch through ``compute_loss`` (normalised as Trainer does), then backward:
    ``(loss, {name: grad})``."""
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads
