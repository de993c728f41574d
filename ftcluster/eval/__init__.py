"""`ftcluster eval`: a model (a run's final/, an adapter, a checkpoint or a base model) and a baseline scored
side by side: perplexity on the eval split and on general text (forgetting), and the greedy answers to the
eval prompts by the metrics of ftcluster.eval.scores; eval.json, outputs.jsonl and the Markdown report eval.md.

targets.py says what a spec names (from files alone), command.py checks and prepares everything in the
launching process, worker.py scores the models on each rank, report.py writes eval.md.
"""
