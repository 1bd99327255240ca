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
