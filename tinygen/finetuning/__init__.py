"""Fine-tuning: the methods' parts (lora, adapters, prompt_tuning) and their table (methods),
the multi-task data (tasks), the run (finetune) and its evaluation (evaluate)."""
