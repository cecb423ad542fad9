"""Shared pieces of the distributed tests: a tiny model with every factor non-zero, and batches with images."""

import copy

import torch

from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM


def tiny_model(dtype=torch.float64, seed=0, **overrides) -> LibraForCausalLM:
    """A tiny Libra whose bridge B factors are random too (zero at init would hide bridge sharding errors)."""
    torch.manual_seed(seed)
    model = LibraForCausalLM(LibraConfig.tiny(**overrides), backend="torch").to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # not all ones, so a norm gradient mix-up would show
            elif name.endswith("weight_B"):
                param.normal_(0.0, 0.1)
    return model


def make_batch(config: LibraConfig, batch: int, length: int, images: list[tuple[int, int]], seed: int,
               dtype=torch.float64):
    """A batch as the collator makes it: images (sample, start) of max_vision_token_length positions, text
    elsewhere, labels = ids with -100 at the first position, at every BOI and after every EOI, a contiguous
    signal at code rows."""
    g = torch.Generator().manual_seed(seed)
    image_len, text_vision = config.max_vision_token_length, config.text_vision_index
    vision_indices = torch.full((batch, length), text_vision, dtype=torch.int64)
    for b, start in images:
        end = min(start + image_len, length)
        vision_indices[b, start:end] = torch.arange(end - start)
    codebooks = config.vision_codebook_num
    text = torch.randint(3, config.vocab_size, (batch, length), generator=g)
    codes = torch.randint(0, config.num_codes, (codebooks, batch, length), generator=g) + config.vocab_size
    ids = text.expand(codebooks, batch, length).clone()
    is_vision = vision_indices < text_vision
    ids = torch.where(is_vision[None], codes, ids)
    ids[:, vision_indices == 0] = config.boi_token_id
    ids[:, vision_indices == config.eoi_vision_index] = config.eoi_token_id
    labels = ids.clone()
    labels[:, :, 0] = -100
    labels[:, vision_indices == 0] = -100
    # The token after an EOI is text predicted from a vision row: masked, as Libra masks that newline.
    after_eoi = torch.zeros_like(is_vision)
    after_eoi[:, 1:] = vision_indices[:, :-1] == config.eoi_vision_index
    labels[:, after_eoi] = -100
    signal = torch.randn(batch, length, config.contiguous_signal_size, generator=g).to(dtype)
    code_rows = is_vision & (vision_indices > 0) & (vision_indices < config.eoi_vision_index)
    signal = signal * code_rows[..., None]
    return {"input_ids": ids, "vision_indices": vision_indices, "labels": labels, "contiguous_signal": signal}


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Samples [start, stop) of a batch made by make_batch."""
    return {"input_ids": batch["input_ids"][:, start:stop], "vision_indices": batch["vision_indices"][start:stop],
            "labels": batch["labels"][:, start:stop], "contiguous_signal": batch["contiguous_signal"][start:stop]}


def clone(model):
    return copy.deepcopy(model)


def check_replicas_identical(model, group) -> None:
    """Every rank of ``group`` holds bit-identical parameters (a SHA-256 of names and bytes, all-gathered)."""
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().contiguous().view(torch.uint8).numpy().tobytes())
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, digest.hexdigest(), group=group)
    assert len(set(everyone)) == 1, everyone


def assert_state_equal(masters: dict, state: dict, expected: dict, steps: int) -> None:
    """Masters and AdamW state (name -> {"exp_avg", "exp_avg_sq", "step"}) bit-equal to ``expected`` ({"masters",
    "state"}), after ``steps`` steps."""
    for name, value in expected["masters"].items():
        assert torch.equal(masters[name], value), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name][key], expected["state"][name][key]), (name, key)
        assert int(state[name]["step"]) == int(expected["state"][name]["step"]) == steps, name


def gathered_optimizer_state(model, optimizer, parallel) -> tuple[dict, dict]:
    """(masters, state) of a distributed optimizer as full tensors: gathered over DP by the optimizer, over TP by
    ``full_state_dict``."""
    from libra_model.parallel.tp_plan import full_state_dict

    masters = full_state_dict(model, parallel.tp_group, source=optimizer.master_params())
    state = optimizer.named_state()
    moments = {k: full_state_dict(model, parallel.tp_group, source={n: s[k] for n, s in state.items()})
               for k in ("exp_avg", "exp_avg_sq")}
    return masters, {n: {"exp_avg": moments["exp_avg"][n], "exp_avg_sq": moments["exp_avg_sq"][n], "step": s["step"]}
                     for n, s in state.items()}


def assert_matches_reference_shards(model, reference, tp_group, **tolerance) -> None:
    """Each (TP-sharded) parameter of ``model`` equals this rank's shard of the same parameter of the unsharded
    ``reference``."""
    from libra_model.modules.tensor_parallel import tp_rule
    from libra_model.parallel.tp_plan import local_shard

    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        want = local_shard(ref_params[name].detach(), tp_rule(name), tp_group)
        torch.testing.assert_close(param.detach(), want, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
