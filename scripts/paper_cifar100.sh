#!/usr/bin/env bash
# The paper's CIFAR-100 table (ID = seen tasks, OOD = unseen class combinations and unseen classes) on one GPU:
#
#   bash scripts/paper_cifar100.sh            full size: configs/{zoo,train,eval}/cifar100_paper.yaml
#   bash scripts/paper_cifar100.sh --quick    reduced size (fewer tasks, steps and prompt forms), for a
#                                             10-minute slot on an H100/H200
#
# Needs, checked before anything trains (see checkpoints.md, "Paper setting"):
#   * CIFAR-100 in torchvision's layout: ~/.cache/tina/cifar/cifar-100-python/{train,test,meta}
#     ($TINA_CIFAR names another parent folder);
#   * OpenAI's CLIP ViT-B/32 as an open_clip checkpoint:
#     ~/.cache/tina/open_clip/ViT-B-32-openai/open_clip_pytorch_model.bin
#     (https://huggingface.co/timm/vit_base_patch32_clip_224.openai).
# Expected time on one H100/H200: not measured yet (no GPU was available when this was written);
# extrapolated from the Fashion-MNIST runs in checkpoints.md, about 5 min with --quick and 20-30 min at full size.
# Extra key=value overrides per step: ZOO_ARGS, TRAIN_ARGS, EVAL_ARGS (e.g. ZOO_ARGS="dataset.verify=false"
# for a stand-in CIFAR copy). Outputs: zoos/, runs/ and outputs/eval/ folders named below; the table is
# printed at the end and kept in OUT/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg (use --quick or nothing)" >&2; exit 2 ;;
  esac
done

tina() { python3 -m tina.cli "$@"; }
device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$quick" = 1 ]; then
  name=cifar100_paper_quick
  zoo_sizes="tasks.train=300 tasks.val=20 tasks.unseen_combo=40 tasks.unseen_class=40 generic.epochs=3 finetune.steps=100"
  train_sizes="trainer.max_steps=1500 trainer.val_every=500 val.tasks=16 trainer.final_val_tasks=20"
  eval_sizes="tasks=40 seeds=1 finetune.tasks=4 image_shots=[1] forms=[names,template,shuffled,random_text,mismatched]"
else
  name=cifar100_paper
  zoo_sizes="" train_sizes="" eval_sizes=""
fi
zoo=zoos/$name run=runs/$name out=outputs/eval/$name
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

stamp "zoo -> $zoo"
# shellcheck disable=SC2086  # the size lists are word lists on purpose
tina -v zoo build configs/zoo/cifar100_paper.yaml out="$zoo" $zoo_sizes ${ZOO_ARGS:-}
stamp "generator -> $run/bundle"
# shellcheck disable=SC2086
tina -v train configs/train/cifar100_paper.yaml zoo="$zoo" out="$run" $train_sizes ${TRAIN_ARGS:-}
stamp "one generated model"
tina generate --checkpoint "$run/bundle" "apple vs bicycle vs dolphin" -o "generated/$name-example" --device "$device"
stamp "evaluation -> $out"
# shellcheck disable=SC2086
tina eval configs/eval/cifar100_paper.yaml --checkpoint "$run/bundle" --zoo "$zoo" --out "$out" --device "$device" \
  $eval_sizes ${EVAL_ARGS:-}
stamp "done; table in $out/results.md"
