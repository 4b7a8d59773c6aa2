"""apt_min: Acoustic Prompt Tuning (Liang et al.) — a frozen audio encoder and a frozen Llama joined by a small
trainable aligner that turns each clip into 32 soft prompts. One file per component; see README.md for the tour."""
