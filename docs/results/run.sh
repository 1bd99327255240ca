#!/usr/bin/env bash
# The experiments of docs/RESULTS.md, in order, each a `largebatch` command on 2 CPU processes with fixed seeds.
# Usage: bash docs/results/run.sh [OUT]   (default results/; each experiment keeps its points, so a rerun resumes)
set -euo pipefail
OUT=${1:-results}
LB=${LB:-largebatch}
QS=configs/quickstart.yaml

# 1. Linear scaling + warmup (Goyal et al. 2017): held-out accuracy after 100 and after 20 epochs vs global batch,
#    with the 5-epoch warmup and without it.
for epochs in 100 20; do
  $LB sweep --config $QS train.epochs=$epochs --global-sizes 64,128,256,512,1024 --nproc 2 --out $OUT/1-goyal-warmup-$epochs
  $LB sweep --config $QS train.epochs=$epochs schedule.warmup_epochs=null --global-sizes 64,128,256,512,1024 --nproc 2 \
      --out $OUT/1-goyal-no-warmup-$epochs
done

# 2. LARS vs SGD on the BatchNorm CNN, 150 epochs, at growing batch (each with its own tuned LR and rule).
$LB sweep --config configs/lars-resnet.yaml --global-sizes 128,512,1024 --nproc 2 --out $OUT/2-lars
$LB sweep --config configs/lars-resnet.yaml optim.name=sgd optim.lr=0.05 optim.scaling=linear optim.trust_coefficient=0.001 \
    --global-sizes 128,512,1024 --nproc 2 --out $OUT/2-sgd

# ... and LAMB vs AdamW on the tiny GPT (configs/lamb-lm.yaml: sqrt rule from lr 0.004 at 64), 9 epochs at each batch.
$LB sweep --config configs/lamb-lm.yaml train.steps=null train.epochs=9 schedule.warmup_steps=null schedule.warmup_epochs=1 \
    --optimizers lamb,adamw --global-sizes 256,1024 --nproc 2 --out $OUT/2-lamb-adamw

# 3. Steps vs examples to 95 % held-out accuracy across batch sizes; fitted B_crit beside the measured noise scale.
$LB sweep --config $QS train.noise_scale=true --global-sizes 64,128,256,512,1024 --target eval/accuracy=0.95 \
    --nproc 2 --out $OUT/3-critical-batch

# 4. Linear vs square-root LR scaling for AdamW (reference batch 64, lr 0.002), 100 epochs.
for rule in linear sqrt; do
  $LB sweep --config $QS optim.name=adamw optim.lr=0.002 optim.weight_decay=0.05 optim.scaling=$rule \
      --global-sizes 64,256,1024 --nproc 2 --out $OUT/4-adamw-$rule
done

# 5. Batch-size ramp and gns vs fixed batches: steps and examples to 95 % held-out accuracy.
$LB sweep --config $QS batch.schedule=ramp batch.start_size=64 batch.micro_size=32 batch.ramp_samples=20000 \
    --global-sizes 512 --target eval/accuracy=0.95 --nproc 2 --out $OUT/5-ramp
$LB sweep --config $QS batch.schedule=gns batch.start_size=64 batch.micro_size=32 train.noise_scale=true \
    train.log_every=2 --global-sizes 512 --target eval/accuracy=0.95 --nproc 2 --out $OUT/5-gns

# 6. BatchNorm vs GroupNorm at a small per-process batch: global 512 as 2 × micro 8 × accum 32, and BatchNorm with
#    the whole share in one micro-batch (2 × micro 256).
for norm in batch group; do
  $LB sweep --config $QS model.norm=$norm batch.micro_size=8 --global-sizes 512 --nproc 2 --out $OUT/6-$norm-micro8
done
$LB sweep --config $QS model.norm=batch --global-sizes 512 --nproc 2 --out $OUT/6-batch-micro256

# 7. Muon vs AdamW vs LAMB on the tiny GPT (configs/lamb-lm.yaml, square-root rule for all three): steps and examples
#    to held-out loss 2.6 nats/byte across global batch, 300-step cap (the cosine's length), evaluated every 2 steps.
LM7="train.steps=300 data.eval_fraction=0.05 train.eval_every=2"
$LB sweep --config configs/lamb-lm.yaml optim.name=muon optim.lr=0.02 optim.options.adamw_lr=0.004 $LM7 \
    --global-sizes 32,64,128,256,512 --target eval/loss=2.6 --nproc 2 --out $OUT/7-muon
for opt in adamw lamb; do
  $LB sweep --config configs/lamb-lm.yaml optim.name=$opt $LM7 --global-sizes 32,64,128,256,512 --target eval/loss=2.6 \
      --nproc 2 --out $OUT/7-$opt
done

# 8a. The branched critical batch (train.cbs_every) beside the noise scale over one run: the tiny GPT (AdamW, global
#     64, both measured every 50 steps) and the digits ResNet (the quickstart, every 10 steps); report/critical_batch.png.
TORCHRUN=${TORCHRUN:-torchrun}
$TORCHRUN --nproc-per-node 2 -m largebatch train --config configs/lamb-lm.yaml optim.name=adamw \
    batch.global_size=64 batch.micro_size=16 train.steps=300 data.eval_fraction=0.05 train.eval_every=50 \
    train.noise_scale=true train.cbs_every=50 "train.cbs_sizes=[32,64,128,256,512]" train.cbs_examples=1024 \
    run.dir=$OUT/8-cbs-gpt
$LB report $OUT/8-cbs-gpt
$TORCHRUN --nproc-per-node 2 -m largebatch train --config $QS batch.micro_size=16 \
    train.noise_scale=true train.cbs_every=10 "train.cbs_sizes=[32,64,128,256,512]" train.cbs_examples=1024 \
    run.dir=$OUT/8-cbs-digits
$LB report $OUT/8-cbs-digits

# 8b. A steps batch warmup whose thresholds follow 8a's GPT curve against fixed batches given the same LR schedule in
#     examples: steps and examples to held-out loss 2.2, 2.0 and 1.85 nats/byte.
LM8="optim.name=adamw train.steps=300 data.eval_fraction=0.05 train.eval_every=4"
for S in 0 1; do
  $LB sweep --config configs/lamb-lm.yaml $LM8 run.seed=$S batch.schedule=steps batch.micro_size=16 \
      "batch.thresholds=0:32 3200:64 6400:128" --global-sizes 128 --target eval/loss=1.85 --nproc 2 \
      --out $OUT/8-warmup-s$S
  $LB sweep --config configs/lamb-lm.yaml optim.name=adamw data.eval_fraction=0.05 train.eval_every=3 run.seed=$S \
      train.steps=1200 schedule.warmup_steps=80 batch.micro_size=16 --global-sizes 32 --target eval/loss=1.85 --nproc 2 \
      --out $OUT/8-fixed32-s$S
done
$LB sweep --config configs/lamb-lm.yaml optim.name=adamw data.eval_fraction=0.05 train.eval_every=6 \
    train.steps=2400 schedule.warmup_steps=160 batch.micro_size=8 --global-sizes 16 --target eval/loss=1.85 --nproc 2 \
    --out $OUT/8-fixed16
$LB sweep --config configs/lamb-lm.yaml optim.name=adamw data.eval_fraction=0.05 train.eval_every=3 \
    train.steps=600 schedule.warmup_steps=40 batch.micro_size=16 --global-sizes 64 --target eval/loss=2.0 --nproc 2 \
    --out $OUT/8-fixed64
$LB sweep --config configs/lamb-lm.yaml $LM8 --global-sizes 128 --target eval/loss=2.0 --nproc 2 --out $OUT/8-fixed128
$LB sweep --config configs/lamb-lm.yaml $LM8 run.seed=1 --global-sizes 128 --target eval/loss=2.2 --nproc 2 \
    --out $OUT/8-fixed128-s1
$LB sweep --config configs/lamb-lm.yaml $LM8 --global-sizes 64 --target eval/loss=2.2 --nproc 2 --out $OUT/8-fixed64-config
