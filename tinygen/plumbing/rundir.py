"""The names of the files in a run directory, defined once.

    RUN_DIR/
      config.json              CONFIG        GPT-2 config (GPTConfig.to_hf)      } a transformers
      model.safetensors        MODEL         the weights, HF GPT-2 names         } checkpoint
      tokenizer.json           TOKENIZER     the tokenizer
      train_config.json        TRAIN_CONFIG  the run's resolved settings (tinygen.pretrain.RunSettings)
      train_state.safetensors  TRAIN_STATE   params, AdamW m/v/t, step: what --resume reads
      metrics.jsonl            METRICS       one row per step
      loss.svg                 LOSS_SVG      the loss curve
      expert_load.svg          EXPERT_LOAD_SVG  with experts: each expert's share of the tokens, per block
      data/                    DATA_DIR      the token cache (tinygen.data.token_cache):
        train.npy              TRAIN_TOKENS    training split, memory-mapped
        val.npy                VAL_TOKENS      validation split
        tokens.json            TOKENS_INFO     digests and counts; written last
      .tinygen.lock            LOCK_FILE     the one writer's lock and pid (tinygen.plumbing.lock)

    A fine-tuning run (tinygen.finetuning.finetune) adds:
      finetune.json            FINETUNE      the method, its FinetuneConfig, the base (path relative to the run + sha256)
      adapter.safetensors      ADAPTER       the method's own tensors over the base (all methods but full)
      adapter_config.json      PEFT_CONFIG   } the same adapter in Hugging Face PEFT's layout
      adapter_model.safetensors PEFT_WEIGHTS } (LoRA and prompt tuning: tinygen.finetuning.peft)

Every module that writes or reads one of these files imports its name from
here (checkpoint.py, data.py, train.py, pretrain.py, runs.py, the fine-tuning
modules, the commands), so a writer and its reader cannot disagree about a spelling. Nothing here imports
anything: any layer of the package may use it.
"""

CONFIG = "config.json"
MODEL = "model.safetensors"
TOKENIZER = "tokenizer.json"
TRAIN_CONFIG = "train_config.json"
TRAIN_STATE = "train_state.safetensors"
METRICS = "metrics.jsonl"
LOSS_SVG = "loss.svg"
EXPERT_LOAD_SVG = "expert_load.svg"
DATA_DIR = "data"
TRAIN_TOKENS = "train.npy"
VAL_TOKENS = "val.npy"
TOKENS_INFO = "tokens.json"
FINETUNE = "finetune.json"
ADAPTER = "adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LOCK_FILE = ".tinygen.lock"
