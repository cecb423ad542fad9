"""The model boundary: an empty batch (B = 0 or N = 0) is a clear ValueError, never a reshape error deep inside;
the extreme modality mixes (all text, all vision) still run."""

import pytest
import torch

from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LibraForCausalLM(LibraConfig.tiny(), backend="torch")


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_is_a_clear_error(model, shape):
    config = model.config
    ids = torch.zeros(config.vision_codebook_num, *shape, dtype=torch.int64)
    vision = torch.full(shape, config.max_vision_token_length)
    with pytest.raises(ValueError, match=r"input_ids is empty .* needs at least one sequence \(B >= 1\) of at least "
                                         r"one token \(N >= 1\)"):
        model(ids, vision, labels=ids)


@pytest.mark.parametrize("mix", ["all_text", "all_vision"])
def test_extreme_mixes_give_a_finite_loss(model, mix):
    config = model.config
    batch, length = 2, 7
    if mix == "all_text":
        vision = torch.full((batch, length), config.max_vision_token_length)
        ids = torch.randint(3, config.vocab_size, (batch, length)).expand(config.vision_codebook_num, -1, -1)
    else:
        vision = torch.randint(1, config.max_vision_token_length - 1, (batch, length))
        ids = torch.randint(config.vocab_size, config.total_vocab_size, (config.vision_codebook_num, batch, length))
    ids = ids.contiguous()
    out = model(ids, vision, labels=ids)
    assert torch.isfinite(out.loss)
