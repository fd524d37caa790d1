"""Slurm: job shape and checks (`job`), batch scripts from the `slurm/` templates (`script`), the
`ftlab slurm` command (`cli`), and preemption with automatic requeue and resume (`preemption`)."""
