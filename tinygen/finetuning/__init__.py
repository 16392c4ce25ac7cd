"""Fine-tuning: the methods (lora, adapters, prompt_tuning), the multi-task data (tasks),
the run (finetune) and its evaluation (evaluate)."""
