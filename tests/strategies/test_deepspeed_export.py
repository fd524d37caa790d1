"""DeepSpeed under bf16-mixed trains a bf16 module and keeps fp32 master weights in its optimizer: the export at
the end of a fit writes the master weights, not the module's bf16 copy widened back to fp32 (which lost the
low 16 bits of every trained weight). 2 ranks on CPU (gloo)."""

import pytest
import torch
from safetensors.torch import load_file

from tests.test_strategies import distributed_fit


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_mixed_precision_export_writes_the_fp32_master_weights(tmp_path_factory, tiny_models, reviews_csv, strategy):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # the ZeRO-2 run is test_strategies' bf16-mixed run (shared when both run in one session)
    run = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, strategy, "Full",
                          "--trainer.precision=bf16-mixed")["dir"]
    # the masters as DeepSpeed's own zero_to_fp32 reads them from the last checkpoint (saved after the last step)
    masters = {k.removeprefix("model."): v for k, v in
               get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "last.ckpt")).items()}
    exported = load_file(run / "export" / "model.safetensors")
    trained = [name for name in exported if name in masters]
    assert len(trained) == len(masters) > 0  # every trained weight exported, under its own name
    rounded = 0
    for name in trained:
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], masters[name]), name
        rounded += int((masters[name].bfloat16().float() != masters[name]).any())
    assert rounded == len(trained)  # no master is a bf16 value: a bf16 copy could not have passed
