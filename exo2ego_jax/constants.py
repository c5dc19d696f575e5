"""Token conventions shared by the data pipeline, the model and scoring (VideoLLaMA2's `constants.py`)."""

VIDEO_TOKEN = "<video>"      # the placeholder in prompt text
VIDEO_TOKEN_INDEX = -201     # its id in input_ids (MODAL_INDEX_MAP['<video>']); replaced by the visual tokens
IGNORE_INDEX = -100          # label of positions the loss skips (prompts, visual tokens, padding)
