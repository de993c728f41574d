"""sbatch templates (slurm/), shipped inside the wheel as ftcluster.slurm."""
