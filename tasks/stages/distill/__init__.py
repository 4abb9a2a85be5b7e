"""The stages `distill-prompt` and `distill-model`: a teacher answers the user's prompts, a student learns the answers.

distill-prompt bakes a long system prompt into the weights: the teacher (by default the model the stage starts
from) answers with the long prompt, the student is trained on the same answers with a short system prompt or none,
so every request stops paying for the long prompt's tokens. distill-model teaches a smaller student to answer like
a bigger teacher on the user's own prompts. Both train the student with `sft` (LoRA, full, ...) on the teacher's
greedy answers, kept verbatim (an answer cut at max_new_tokens is trimmed to its last sentence unless told
otherwise), and measure, on held-out prompts the student never trained on:

- the perplexity of the teacher's held-out answers under the teacher (with its prompt), under the start model
  before training, and under the student: how much of the teacher's behaviour the student took on;
- time to first token of the teacher (with its prompt) and the student (without), same machine, same prompts;
- distill-prompt: prompt tokens per request under each system prompt, and the difference (tokens saved);
- distill-model: decode speed of each and the parameter counts.

Teacher answers come from llama.cpp when the teacher has a GGUF export (the highest-precision one), else from
batched HF generation. The raw answers are cached by their inputs, so a retry of a failed training does not ask the
teacher again; the student's rows are prepared like any other data (content-addressed, split kept: answers to the
data's held-out prompts are the held-out answers).

`settings`: the stage settings and how prompts and rows are built · `teacher`: the teacher's answers as a dataset
(and preference pairs), through its best GGUF export or transformers · `measure`: the student against its teacher
and start · `stages`: the two stage kinds (what they plan, prepare, train and measure).
"""
