"""Preference tuning with Direct Preference Optimization (DPO), from scratch.

Not in the book's chapter: this follows the chapter 7 bonus material "DPO from scratch".
Instruction finetuning (SFT) taught the model *what* to answer. DPO teaches it which of two
answers people prefer. Each training entry holds an instruction, a `chosen` response and a
`rejected` one; DPO raises the probability of the chosen response relative to the rejected
one, measured against a frozen copy of the SFT model (the reference model), so the tuned
model (the policy) does not drift far from what it already knows.

The data, `instruction-data-with-preference.json`, is `instruction_data.PREFERENCE_DATASET`
(downloaded and checked by `instruction_data.load_known_dataset`). The plain code, in the
order of the lesson:
    PreferenceDataset, preference_collate_fn   the data: prompt + chosen, prompt + rejected
    compute_logprobs                            mean log-probability of the response tokens
    compute_dpo_loss                            the DPO loss, and the implicit rewards
    compute_dpo_loss_batch / _loader            the same over a batch / a data loader
    train_model_dpo_simple                      the training loop, logging losses and margins
    plot_dpo_metrics, compare_responses         what changed

Faster paths with the same numbers are in `fast_dpo.py`; the command line is `dpo_train.py`.
"""

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gpt_instruction_finetuning import format_input

# What the chapter's Alpaca prompt puts between the instruction and the response.
RESPONSE_PREFIX = "\n\n### Response:\n"


class PreferenceDataset(Dataset):
    """Pre-tokenizes each entry three ways: the prompt, prompt + chosen, prompt + rejected.

    The full texts are tokenized whole, as in instruction finetuning, so the model sees the
    tokens it was trained on. Not in the book: `response_start`, the number of tokens of
    prompt + "### Response:" tag, so the collate can select exactly the response tokens.
    """

    def __init__(self, data, tokenizer, style=None):
        # Not in the book: `style`, a PromptStyle (the SFT run's: Alpaca, Phi-3 or a hub
        # model's chat template); None is the chapter's Alpaca prompt, as the book has it.
        format_prompt = format_input if style is None else style.format_input
        response_prefix = RESPONSE_PREFIX if style is None else style.response_prefix
        self.data = data
        self.encoded_texts = []
        for entry in data:
            prompt = format_prompt(entry)
            prompt_tokens = tokenizer.encode(prompt)
            chosen_full_tokens = tokenizer.encode(prompt + response_prefix + entry["chosen"])
            rejected_full_tokens = tokenizer.encode(prompt + response_prefix + entry["rejected"])
            self.encoded_texts.append({
                "prompt": prompt_tokens,
                "chosen": chosen_full_tokens,
                "rejected": rejected_full_tokens,
                # Not in the book: where the response begins in "chosen" and "rejected".
                "response_start": len(tokenizer.encode(prompt + response_prefix)),
            })

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def preference_collate_fn(batch, pad_token_id=50256, allowed_max_length=None,
                          mask_prompt_tokens=True, device="cpu"):
    """Pad a batch of PreferenceDataset items into tensors.

    Returns a dict of (batch, n_tokens) tensors: "prompt" (padded to the longest prompt),
    "chosen" and "rejected" (both padded to one common length, so one model call could take
    both), and the bool masks "chosen_mask" and "rejected_mask", True on the tokens whose
    log-probabilities count: the response tokens (with `mask_prompt_tokens=False`: every
    token but the padding). `allowed_max_length` cuts all of them to that many tokens.
    """
    max_prompt = max(len(item["prompt"]) for item in batch)
    max_length_common = max(len(item[key]) for item in batch for key in ("chosen", "rejected"))

    batch_data = {"prompt": [], "chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    for item in batch:
        prompt = item["prompt"]
        batch_data["prompt"].append(torch.tensor(prompt + [pad_token_id] * (max_prompt - len(prompt))))
        for key in ("chosen", "rejected"):
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded), dtype=torch.bool)
            mask[len(sequence):] = False  # padding
            if mask_prompt_tokens:
                mask[:item["response_start"]] = False  # prompt and "### Response:" tag
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)

    for key, tensors in batch_data.items():
        tensor_stack = torch.stack(tensors)
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack.to(device)
    return batch_data


def compute_logprobs(logits, labels, selection_mask=None):
    """Mean log-probability per sequence of the tokens the mask selects.

    logits: (batch, n_tokens, vocab_size), the model's output for `labels`;
    labels: (batch, n_tokens) the token ids; selection_mask: (batch, n_tokens) bool or None.
    Position t's logits predict token t + 1, so the labels and the mask shift left by one.
    Returns (batch,): the average over the selected tokens (over all tokens without a mask).
    """
    labels = labels[:, 1:]  # (batch, n_tokens - 1)
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    # The log-probability of each actual next token: (batch, n_tokens - 1)
    selected_log_probs = torch.gather(log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)

    if selection_mask is None:
        return selected_log_probs.mean(-1)
    mask = selection_mask[:, 1:].to(selected_log_probs.dtype)
    return (selected_log_probs * mask).sum(-1) / mask.sum(-1)


def compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs,
                     reference_chosen_logprobs, reference_rejected_logprobs, beta=0.1):
    """The DPO loss of a batch, and its mean chosen and rejected rewards.

    All four inputs are (batch,) log-probabilities from `compute_logprobs`. The policy's
    preference for the chosen answer, log pi(chosen) - log pi(rejected), is compared with the
    reference model's; the loss -log sigmoid(beta * difference) falls as the policy prefers
    the chosen answer more than the reference did. `beta` sets how far it may move: small
    beta, gentle pressure. While the policy equals the reference, the loss is
    -log sigmoid(0) = ln 2 = 0.693.

    The rewards are DPO's implicit rewards, beta * (log pi - log pi_ref), as in the DPO paper
    and TRL (the book's notebook leaves out beta, so its rewards are 1/beta = 10 times larger).
    Returns (loss, chosen_rewards, rejected_rewards), three scalars; the rewards carry no
    gradient. The reward margin is chosen_rewards - rejected_rewards.
    """
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)  # (batch,)

    chosen_rewards = beta * (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = beta * (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta):
    """The DPO loss and rewards of one collated batch: four model calls, two with no gradient."""
    policy_chosen_log_probas = compute_logprobs(
        policy_model(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
    policy_rejected_log_probas = compute_logprobs(
        policy_model(batch["rejected"]), batch["rejected"], batch["rejected_mask"])
    with torch.no_grad():  # the reference model is frozen
        ref_chosen_log_probas = compute_logprobs(
            reference_model(batch["chosen"]), batch["chosen"], batch["chosen_mask"])
        ref_rejected_log_probas = compute_logprobs(
            reference_model(batch["rejected"]), batch["rejected"], batch["rejected_mask"])
    return compute_dpo_loss(policy_chosen_log_probas, policy_rejected_log_probas,
                            ref_chosen_log_probas, ref_rejected_log_probas, beta=beta)


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None,
                            loss_fn=compute_dpo_loss_batch):
    """Mean loss, chosen reward and rejected reward over the first `num_batches` batches."""
    if len(data_loader) == 0:
        return float("nan"), float("nan"), float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss, total_chosen_rewards, total_rejected_rewards = 0.0, 0.0, 0.0
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        loss, chosen_rewards, rejected_rewards = loss_fn(batch, policy_model, reference_model, beta)
        total_loss += loss.item()
        total_chosen_rewards += chosen_rewards.item()
        total_rejected_rewards += rejected_rewards.item()
    return (total_loss / num_batches, total_chosen_rewards / num_batches,
            total_rejected_rewards / num_batches)


def evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta,
                             eval_iter, loss_fn=compute_dpo_loss_batch):
    """Loss and rewards on `eval_iter` batches of each loader, in eval mode, without gradients."""
    policy_model.eval()
    res = {}
    with torch.no_grad():
        for split, loader in (("train", train_loader), ("val", val_loader)):
            loss, chosen, rejected = compute_dpo_loss_loader(
                loader, policy_model, reference_model, beta, eval_iter, loss_fn)
            res[f"{split}_loss"] = loss
            res[f"{split}_chosen_reward"] = chosen
            res[f"{split}_rejected_reward"] = rejected
    policy_model.train()
    return res


def train_model_dpo_simple(policy_model, reference_model, train_loader, val_loader, optimizer,
                           num_epochs, beta, eval_freq, eval_iter, start_context, tokenizer,
                           loss_fn=compute_dpo_loss_batch):
    """The DPO training loop: like chapter 5's, with reward margins logged beside the losses.

    Every `eval_freq` steps it prints the loss and the reward margin (chosen minus rejected
    reward) on `eval_iter` batches of each loader; after each epoch, a sample continuation of
    `start_context` (None skips it). The batches are already on the device (the collate puts
    them there). Not in the book: `loss_fn`, the batch loss, which fast_dpo replaces; the
    logging is in `log_dpo_evaluation`; its line, `dpo_evaluation_line`, is also what the
    resumable loop of dpo_train.py prints.
    Returns a dict of lists: train/val losses, chosen and rejected rewards, tokens seen.
    """
    from previous_chapters import generate_and_print_sample

    tracking = new_tracking()
    tokens_seen, global_step = 0, -1

    for epoch in range(num_epochs):
        policy_model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss, _, _ = loss_fn(batch, policy_model, reference_model, beta)
            loss.backward()
            optimizer.step()
            tokens_seen += batch["chosen"].numel() + batch["rejected"].numel()
            global_step += 1

            if global_step % eval_freq == 0:
                res = evaluate_dpo_loss_loader(policy_model, reference_model, train_loader,
                                               val_loader, beta, eval_iter, loss_fn)
                log_dpo_evaluation(tracking, res, tokens_seen, epoch, global_step)

        if start_context is not None:
            device = next(policy_model.parameters()).device
            generate_and_print_sample(policy_model, tokenizer, device, start_context)

    return tracking


def new_tracking():
    """The lists train_model_dpo_simple fills, one value per evaluation."""
    return {"train_losses": [], "train_chosen_rewards": [], "train_rejected_rewards": [],
            "val_losses": [], "val_chosen_rewards": [], "val_rejected_rewards": [],
            "tokens_seen": []}


def log_dpo_evaluation(tracking, res, tokens_seen, epoch, global_step):
    """Append one evaluation (from evaluate_dpo_loss_loader) to `tracking` and print it."""
    for split in ("train", "val"):
        tracking[f"{split}_losses"].append(res[f"{split}_loss"])
        tracking[f"{split}_chosen_rewards"].append(res[f"{split}_chosen_reward"])
        tracking[f"{split}_rejected_rewards"].append(res[f"{split}_rejected_reward"])
    tracking["tokens_seen"].append(tokens_seen)
    print(dpo_evaluation_line(res, epoch, global_step))


def dpo_evaluation_line(res, epoch, global_step):
    """The line printed for one evaluation: losses and reward margins (chosen - rejected)."""
    train_margin = res["train_chosen_reward"] - res["train_rejected_reward"]
    val_margin = res["val_chosen_reward"] - res["val_rejected_reward"]
    return (f"Ep {epoch+1} (Step {global_step:06d}): "
            f"Train loss {res['train_loss']:.3f}, Val loss {res['val_loss']:.3f}, "
            f"Train reward margins {train_margin:.3f}, Val reward margins {val_margin:.3f}")


def reward_margins(tracking, split):
    """Chosen minus rejected reward at each evaluation, for "train" or "val"."""
    return [c - r for c, r in zip(tracking[f"{split}_chosen_rewards"],
                                  tracking[f"{split}_rejected_rewards"], strict=True)]


def make_reference_model(model):
    """A frozen copy of `model`: no gradients, eval mode (no dropout), never trained."""
    reference_model = copy.deepcopy(model)
    reference_model.requires_grad_(False)
    return reference_model.eval()


def plot_dpo_metrics(tracking, num_epochs, save_path=None, show=True):
    """Two panels against epochs: the DPO losses, and the reward margins (should rise)."""
    import matplotlib.pyplot as plt

    n = len(tracking["train_losses"])
    epochs_seen = torch.linspace(0, num_epochs, n).tolist()
    fig, (ax_loss, ax_margin) = plt.subplots(1, 2, figsize=(9, 3))
    ax_loss.plot(epochs_seen, tracking["train_losses"], label="Training loss")
    ax_loss.plot(epochs_seen, tracking["val_losses"], linestyle="-.", label="Validation loss")
    ax_loss.set_ylabel("DPO loss")
    ax_margin.plot(epochs_seen, reward_margins(tracking, "train"), label="Training")
    ax_margin.plot(epochs_seen, reward_margins(tracking, "val"), linestyle="-.", label="Validation")
    ax_margin.set_ylabel("Reward margin (chosen - rejected)")
    for ax in (ax_loss, ax_margin):
        ax.set_xlabel("Epochs")
        ax.legend()
    fig.tight_layout()
    if save_path is not None:
        from instructkit.safe_files import write_atomically

        suffix = Path(save_path).suffix.lstrip(".") or "pdf"
        write_atomically(save_path, lambda tmp: fig.savefig(tmp, format=suffix))
    if show:
        plt.show()
    plt.close(fig)
    return fig


def compare_responses(entries, models, tokenizer, max_new_tokens=256, style=None):
    """Each entry with one greedy answer per model: `models` maps a name to a model.

    Returns copies of the entries with a "<name>_response" key per model, e.g.
    {"sft": sft_model, "dpo": policy_model} gives "sft_response" and "dpo_response".
    `style`: the prompt style (a PromptStyle; None: the chapter's Alpaca).
    """
    from gpt_instruction_finetuning import ALPACA
    from instructkit.answers import generate_responses

    answered = [dict(entry) for entry in entries]
    for name, model in models.items():
        responses = generate_responses(model, entries, tokenizer, style or ALPACA,
                                       max_new_tokens=max_new_tokens,
                                       progress=False)
        for entry, response in zip(answered, responses, strict=True):
            entry[f"{name}_response"] = response
    return answered
