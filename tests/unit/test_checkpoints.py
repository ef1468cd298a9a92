"""cfs.checkpoints: which checkpoint a restarted fine-tune may resume from; here that a
sharded (FSDP) checkpoint is complete only with its torch.distributed.checkpoint metadata.
(Resuming for real: tests/end_to_end/test_resume.py and test_fsdp.py.)"""

from __future__ import annotations


def test_a_sharded_checkpoint_without_its_metadata_is_incomplete(tmp_path):
    from cfs.checkpoints import is_complete_checkpoint

    checkpoint = tmp_path / "checkpoint-3"
    (checkpoint / "pytorch_model_fsdp_0").mkdir(parents=True)
    (checkpoint / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text("{}")
    assert not is_complete_checkpoint(checkpoint)
    (checkpoint / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
    assert is_complete_checkpoint(checkpoint)
