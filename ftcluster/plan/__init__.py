"""The planner: per-device memory and step time of a training configuration on a hardware profile, from
the model's config.json alone (no weights), and the candidate configurations `ftcluster plan` compares.

    from ftcluster.config import compose
    from ftcluster.plan import load_profile, predict

    prediction = predict(compose(["model=llama3_8b", "strategy=zero3", "launcher.workers=8"]),
                         load_profile("h100_sxm"))
    prediction.peak_bytes_per_rank, prediction.memory, prediction.tokens_per_s, prediction.mfu

shape (config.json -> tensors), flops, memory, comms: the formulas; profiles: conf/cluster/*.yaml;
predict: one config; planner: the candidates; report: the table.
"""

from ftcluster.plan.planner import Candidate, Plan, plan
from ftcluster.plan.predict import Prediction, predict
from ftcluster.plan.profiles import ClusterProfile, load_profile

__all__ = ["Candidate", "ClusterProfile", "Plan", "Prediction", "load_profile", "plan", "predict"]
