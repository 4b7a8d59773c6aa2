"""apt_min: Acoustic Prompt Tuning (Liang et al.) — a frozen audio encoder and a frozen Llama joined by a small
trainable aligner that turns each clip into a few soft prompts (per clip, or per window of it). One file per
component; README.md has the tour."""
