"""A trimmed copy of the pattern of transformers' official `examples/pytorch/text-classification/run_glue.py`
(written for these tests, not copied): `HfArgumentParser` over model, data and training arguments, `datasets`
files, `evaluate` metrics, `Trainer`, `--resume_from_checkpoint`, `save_model`, `predict`.

The LoR2C version differs from the plain one by the lines marked `# LoR2C`: the Trainer class and its
`lor2c_config` (whose fields `HfArgumentParser` exposes as flags like `--method imlor2c --num_merges 1`).
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, HfArgumentParser,
                          TrainingArguments, set_seed)

from lor2c_hf import LoR2CConfig, LoR2CTrainer  # LoR2C
from lor2c_hf.extras.glue_metric import load_glue_metric  # evaluate.load("glue", task) without the Hub


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Path to a pretrained model or model id."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "A csv or json file with columns sentence and label."})
    validation_file: str = field(metadata={"help": "A csv or json file with columns sentence and label."})
    task_name: str = field(default="sst2", metadata={"help": "The GLUE task whose metric is computed."})
    max_seq_length: int = field(default=64, metadata={"help": "Longest tokenized sentence; longer ones are truncated."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set."})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, LoR2CConfig))  # LoR2C
    model_args, data_args, training_args, lor2c_config = parser.parse_args_into_dataclasses()  # LoR2C
    set_seed(training_args.seed)

    extension = data_args.train_file.rsplit(".", 1)[-1]
    raw = load_dataset(extension, data_files={"train": data_args.train_file, "validation": data_args.validation_file})
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(data_args.max_train_samples))
    num_labels = len(set(raw["train"]["label"]))

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, num_labels=num_labels)

    def preprocess(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=data_args.max_seq_length)

    data = raw.map(preprocess, batched=True)  # keeps "sentence": Trainer drops the columns forward does not take
    metric = load_glue_metric(data_args.task_name)

    def compute_metrics(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return metric.compute(predictions=np.argmax(preds, axis=1), references=p.label_ids)

    trainer = LoR2CTrainer(  # LoR2C (was: Trainer)
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        compute_metrics=compute_metrics, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        lor2c_config=lor2c_config,  # LoR2C
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        predictions = trainer.predict(data["validation"]).predictions
        np.save(os.path.join(training_args.output_dir, "predict_logits.npy"), predictions)
    json.dump({"argv": sys.argv[1:]}, open(os.path.join(training_args.output_dir, "client_argv.json"), "w"))


if __name__ == "__main__":
    main()
