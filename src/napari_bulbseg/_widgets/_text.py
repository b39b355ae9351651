"""Every user-facing string of the widgets: labels, tooltips and messages, in one place."""

from __future__ import annotations

# --------------------------------------------------------------------------- layer names
PROB_SUFFIX = " probability"
PRED_SUFFIX = " prediction"
CORR_SUFFIX = " corrections"
DIFF_SUFFIX = " difference"

# --------------------------------------------------------------------------- segment
MODEL_BUNDLED = "Bundled default model"
MODEL_FOLDER = "Model folder…"
MODEL_CURRENT = "Current model ({})"
TIP_IMAGE = "The image (or stack) to segment."
TIP_MODEL = (
    "Which U-Net to use: the bundled default, a version fine-tuned on your data, "
    "or a model folder (model.json + weights.safetensors)."
)
TIP_FOLDER = "A model folder holding model.json and weights.safetensors."
TIP_DEVICE = "Where the network runs: auto picks CUDA, then Apple MPS, then the CPU."
TIP_TILE = (
    "Images are cut into square tiles of this size; the output always has the input's size. "
    "Smaller tiles use less memory."
)
TIP_OVERLAP = "Overlap between tiles, in pixels; larger hides tile seams better."
TIP_TTA = "Test-time augmentation: average 8 flips/rotations. Smoother, 8× slower."
BTN_RUN = "Segment stack"
BTN_CANCEL = "Cancel"
MSG_NO_IMAGE = "Choose an image layer first."
MSG_NO_FOLDER = "Choose a model folder, or pick another model."
TIP_DIAMETER = (
    "Typical object diameter in pixels, 'auto' to measure it once for the stack, 'auto-slice' "
    "to measure every slice, or 'none' for the image's own scale: the image is rescaled "
    "internally to the size the model was trained at (its card says which) and the mask comes "
    "back at the image's size. Empty: the model's default ('auto-slice' for the bundled model "
    "and fine-tuned versions)."
)
HINT_DIAMETER = "model default"
MSG_PREDICTING = "Predicting slice {z} first, then the rest of the stack…"
MSG_KEPT_RULES = (
    "Kept your threshold {t:.2f} and object rules; this model suggests {card:.2f} "
    "(Threshold & objects ▸ Model's suggestion applies it)."
)
MSG_PRED_DONE = "Segmented {n} slice(s) with {model} in {s:.1f} s."
MSG_PRED_CANCELLED = "Prediction cancelled; {n} slice(s) were finished and kept."
MSG_LOADING = "Loading model…"
MSG_LOAD_CANCELLED = "Cancelled while loading the model; nothing was predicted."
MSG_IMAGE_GONE = "The image was closed while the model loaded; nothing was predicted."
BTN_EXPORT_MODEL = "Export for bioimage.io…"
TIP_EXPORT_MODEL = (
    "Write the chosen model as a bioimage.io package (.zip) that other tools (bioimageio.core, "
    "ilastik, deepImageJ) can run, and that napari-bulbseg can import again."
)
DLG_EXPORT_MODEL = "Export model for bioimage.io"
DLG_EXPORT_FILTER = "bioimage.io package (*.zip)"
MSG_EXPORTING = "Exporting the model to {path}…"
MSG_EXPORTED_MODEL = "Model exported to {path} (bioimage.io format {version})."
MSG_EXPORT_NOTES = " Other tools will not apply: {notes}."
MSG_BAD_NDIM = (
    "Layer {name!r} has {ndim} dimensions; napari-bulbseg segments 2D images and (Z, Y, X) stacks."
)

# --------------------------------------------------------------------------- threshold
TIP_THRESHOLD = (
    "A pixel is foreground when its probability is at least this value. "
    "The mask updates at once, without re-running the network."
)
TIP_MIN_SIZE = "Remove objects smaller than this many pixels (0 keeps all)."
TIP_KEEP = "Keep only the N largest objects per slice (0 keeps all); 2 for olfactory bulbs."
TIP_FILL = "Fill holes enclosed by an object."
TIP_EXPECTED = (
    "Most objects a slice should have (0: no check). Slices with more are listed below, "
    "so you can review them first."
)
TIP_USE_CARD = "Use the threshold the model's validation sweep found best."
TIP_SWEEP = "Find the threshold that maximises Dice on the slices you have reviewed."
BTN_USE_CARD = "Model's suggestion"
BTN_SWEEP = "Suggest from reviewed slices"
LBL_NO_FLAGS = "No slice breaks the object-count prior."
LBL_FLAGS = "{n} slice(s) break the prior: {which}"
LBL_CARD = "Model suggests {t:.2f}"
LBL_SWEEP = "Reviewed slices suggest {t:.2f} (Dice {d:.3f})"
MSG_NO_PROB = "Segment the stack first: there are no probabilities to threshold yet."
MSG_NO_REVIEWED = "Mark some slices as reviewed (in Review & correct) first."

# --------------------------------------------------------------------------- review
TIP_TRUTH = (
    "The reference mask: a ground-truth layer, or your corrections. Differences to the "
    "prediction are shown in colour: magenta = false positive, green = false negative."
)
BTN_START_CORR = "Start corrections from the prediction"
TIP_START_CORR = (
    "Copy the prediction into an editable corrections layer; paint (label 1) or erase (label 0) "
    "with napari's brush. Your edits are saved automatically."
)
BTN_RESTORE = "Restore saved corrections"
LBL_RESTORE = "Saved corrections found ({n} reviewed slice(s), saved {when})."
WHEN_TODAY = "today {hm}"
WHEN_YESTERDAY = "yesterday {hm}"
WHEN_DATE = "{day} {month_year} {hm}"
WHEN_UNKNOWN = "at an unknown time"
CHK_REVIEWED = "This slice is reviewed"
TIP_REVIEWED = "Reviewed slices are used for fine-tuning and for the threshold suggestion."
BTN_NEXT = "Reviewed → next to correct"
TIP_NEXT = (
    "Mark this slice reviewed and show the unreviewed slice most worth correcting "
    "(the top of the list below; the next slice in order while there is no list yet)."
)
BTN_GOTO_NEXT = "Show the slice most worth correcting"
LBL_QUEUE = "Correct next ({n} unreviewed slice(s), most worth correcting first):"
LBL_QUEUE_EMPTY = "Correct next: every predicted slice is reviewed."
LBL_QUEUE_WAIT = "Correct next: the list appears once slices are predicted."
QUEUE_ROW = "slice {z} · {score:.2f} · {why}"
TIP_QUEUE = (
    "Unreviewed slices ranked by how much correcting them is likely to teach the model: "
    "uncertain pixels (expected error from the probabilities), more objects than your keep-N "
    "or expected count allows, small specks, and area jumps between neighbouring slices. "
    "Click a row to show that slice. Reviewed slices leave the list; it is refreshed after "
    "every prediction and change of the rules."
)
BTN_EXPORT = "Export metrics CSV…"
LBL_SUMMARY = (
    "Stack ({n} slices): Dice {dice:.3f} · IoU {iou:.3f} · pixel error {err:.2f}% · "
    "objects: {hits} hit, {misses} missed, {fps} false"
)
LBL_SLICE = "Slice {z}: Dice {dice:.3f} · IoU {iou:.3f} · errors {fp} FP + {fn} FN px"
LBL_SAVED = "Corrections autosaved at {when}."
LBL_NO_TRUTH = "Choose a reference layer to compare against."
TABLE_HEADERS = ("z", "Dice", "IoU", "err %", "hits", "miss", "FP obj", "✓")
TABLE_TIPS = (
    "slice index",
    "Dice (F1) of the prediction vs the reference",
    "intersection over union",
    "pixel error: percentage of pixels that differ",
    "reference objects matched by a predicted one (IoU > 0.5)",
    "reference objects with no match",
    "predicted objects matching no reference object",
    "slice marked as reviewed",
)
MSG_NEED_PRED = "Segment the stack first: there is no prediction to compare or correct."
MSG_SHAPE = "The reference {a!r} has shape {sa}, the prediction {sb}: they must match."
MSG_RESTORED = "Restored your saved corrections for {name!r} ({n} reviewed slice(s))."
MSG_EXPORTED = "Metrics written to {path}"
MSG_AUTOSAVE_FAIL = "Could not autosave corrections: {err}"

# --------------------------------------------------------------------------- fine-tune
TIP_LOSS = "Training loss: focal+dice suits small or thin objects; bce is the classic choice."
TIP_EPOCHS = "Passes over the reviewed slices."
LBL_START = "Start from"
#: the names shown for ``options.START_MODES``
START_NAMES = {"auto": "auto", "base": "base model", "scratch": "new weights"}
TIP_START = (
    "auto: the base model is scored on the held-out slices first; below Dice 0.5 a short trial "
    "on the same patches decides between refining it and new weights. base model: always "
    "refine the current model. new weights: train a new model of the same shape."
)
TIP_BUDGET = (
    "Stop after this many minutes even if epochs remain (0 = no limit). The best validated "
    "epoch so far is kept."
)
BTN_TRAIN = "Fine-tune on reviewed slices"
BTN_REPREDICT = "Re-predict with version {version}"
CHK_ONLY_BETTER = "Use the new version only if it beats the current one"
TIP_ONLY_BETTER = (
    "Both models are scored on the same held-out slices. A new version that is not better (or "
    "finds nothing) is still saved, but the current model stays; pick it in Segment to use it."
)
CHK_THEN_PREDICT = "Then re-predict the stack with it (next round)"
LBL_ROUNDS = "Rounds (validation Dice, previous → new): {rounds}"
TIP_ROUNDS = (
    "Each fine-tuning round that led to the current model, with the Dice of the previous and "
    "the new model on that round's held-out slices (more slices are held out as you review more)."
)
BTN_REPREDICT_NONE = "Re-predict (after fine-tuning or a rollback)"
BTN_ROLLBACK = "Roll back to the previous version"
LBL_NEED_REVIEW = (
    "Review at least two slices (Review & correct) to fine-tune: one is held out to validate."
)
LBL_ONE_REVIEWED = (
    "1 reviewed slice: review one more to fine-tune (at least one slice is held out to "
    "validate the new model)."
)
MSG_TRAIN_DONE = "Training ended ({reason}); weights of epoch {epoch} kept."
MSG_PREPARING = "Preparing the reviewed slices…"
MSG_SPLIT = (
    "Fine-tuning on {n_train} reviewed slice(s); {n_val} held out to validate "
    "(fixed by slice content, so they stay held out in later rounds); at most {budget}."
)
LBL_READY = "{n} reviewed slice(s) ready; starts from {model}."
CURRENT_MODEL = "the current model (restored corrections: no need to segment again)"
LBL_ONE_IMAGE = (
    "It trains on the reviewed slices of {image} only; to fine-tune on several images, open them "
    "as one stack (put them in one folder and open the folder), or run `bulbseg train` on "
    "their image and mask folders."
)
LBL_TRAINING = "epoch {epoch} · step {step}/{total} · loss {loss:.4f} · ETA {eta:.0f} s"
LBL_RESULT = (
    "Saved version {version}. Validation Dice on {n} held-out slice(s): "
    "{before} (previous model) → {after} (new)."
)
LBL_ROLLED = "Current model is now version {version}."
MSG_TRAIN_CANCELLED = "Fine-tuning cancelled; no new version was saved."
MSG_NO_MODEL = "Segment the stack first, so there is a model to fine-tune."
MSG_NO_CORR = "Start corrections (Review & correct) and mark slices as reviewed first."
