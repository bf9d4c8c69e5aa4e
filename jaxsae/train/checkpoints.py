"""Checkpoints: orbax, asynchronous, each with a digest of its values, restored exactly.

Rerunning a killed run resumes from the newest checkpoint that restores intact; one cut short
or corrupted is moved aside and the previous one used. A failed write (a full disk) is one
clear error naming the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsae.errors import JaxsaeError
from jaxsae.train.plan import Checkpoints, RunPlan

# Where each checkpoint records the digest of its values (orbax custom metadata).
DIGEST_KEY = "jaxsae_digest"
SKIPPED_KEY = "non_finite_skipped"


def to_host(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def checkpoint_manager(plan: Checkpoints):
  import orbax.checkpoint as ocp
  from orbax.checkpoint import checkpoint_managers as policies

  keep = [policies.LatestN(max(plan.keep, 1))]
  if plan.keep_steps:
    keep.append(policies.CustomSteps(list(plan.keep_steps)))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep),
      enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True)
  return ocp.CheckpointManager(plan.directory, options=options)


def restore_latest(mngr, abstract_state):
  """The newest checkpoint that restores intact, skipping any that does not; None if none."""
  import orbax.checkpoint as ocp

  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
      recorded = saved_metadata(mngr, step).get(DIGEST_KEY)
      # Checkpoints written before digests were recorded have none; they restore unchecked.
      if recorded is not None and recorded != digest(state):
        raise ValueError("its values differ from the digest recorded when it was saved "
                         "(flipped bytes on disk)")
      return state
    except Exception as e:  # cut short by a kill, or corrupted: fall back to an older one
      # Moved aside, not deleted (a person may want to look), so that its step can be saved
      # again; the new name is no step number, so orbax never lists it.
      aside = f"unreadable-{step}-{int(time.time())}"
      logging.warning("checkpoint %d in %s is unusable (%s); moved it to %s and resuming from "
                      "the previous one", step, mngr.directory, str(e)[:200], aside)
      if jax.process_index() == 0:
        (mngr.directory / str(step)).rename(mngr.directory / aside)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxsae_restore_skip")
      mngr.reload()
  return None


@jax.jit
def _checksums(state):
  def one(a):
    a = a.reshape(-1)
    if a.dtype.itemsize == 4:
      u = jax.lax.bitcast_convert_type(a, jnp.uint32)
    elif a.dtype.itemsize == 2:
      u = jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)
    else:
      u = a.astype(jnp.uint32)
    # Odd weights: any change to any one word changes the sum (odd numbers are invertible
    # mod 2**32), and so does moving a value to another position.
    return jnp.sum(u * (2 * jnp.arange(u.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)
  return jnp.stack([one(a) for a in jax.tree.leaves(state)])


def digest(state) -> str:
  """A checksum of every value of the state, computed where the state lives.

  Orbax stores no checksum of array data: a flipped bit inside a complete checkpoint restores
  silently as a different number. So every save records this digest, and a restore must
  reproduce it. Integer sums are exact, so the digest does not depend on the device layout.
  """
  sums = _checksums(state)
  return "".join(f"{int(v):08x}" for v in np.asarray(sums.addressable_data(0)))


def save(mngr, state, skipped: int = 0) -> None:
  import orbax.checkpoint as ocp
  with writing(mngr):
    mngr.save(int(state["step"].get_value()), args=ocp.args.StandardSave(state), force=True,
              custom_metadata={DIGEST_KEY: digest(state), SKIPPED_KEY: skipped})


def saved_metadata(mngr, step: int) -> dict:
  """What jaxsae recorded beside checkpoint `step` (empty for checkpoints of older versions)."""
  return mngr.metadata(step).custom_metadata or {}


@contextlib.contextmanager
def writing(mngr):
  """Turns a failed checkpoint write (a full disk, a quota) into one clear error."""
  try:
    yield
  except (JaxsaeError, KeyboardInterrupt):
    raise
  except Exception as e:  # tensorstore reports write failures as ValueError, orbax re-raises
    last = mngr.latest_step()
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    code = re.search(r"os_error_code='(\d+)'", text)  # tensorstore's long message hides it
    raise JaxsaeError(
        f"writing a checkpoint to {mngr.directory} failed "
        f"({os.strerror(int(code.group(1))) if code else text[:300]}); "
        + (f"the last complete one is step {last}" if last is not None else "none is complete")
        + ": free space and rerun the same command to resume") from e


def close(mngr, raise_errors: bool = True) -> None:
  """Waits for an asynchronous save (never left half-written on the way out), then closes;
  with `raise_errors` off, a failed write is left untold (another error is on its way out)."""
  try:
    with writing(mngr):
      mngr.wait_until_finished()
  except JaxsaeError:
    if raise_errors:
      raise
  finally:
    mngr.close()


def stop_if_bad(state: nnx.State, plan: RunPlan, mngr) -> None:
  """A seed's non-finite loss stops the run at the last good checkpoint, naming the seed."""
  bad = to_host(state["seeds"]["bad_step"].get_value())
  if (bad >= 0).any():
    i = int(np.argmax(bad >= 0))
    with writing(mngr):
      mngr.wait_until_finished()
    last = mngr.latest_step()
    data_seeds = plan.identity.data_seeds
    who = f"seed {plan.seeds[i]}" + (f" (data seed {data_seeds[i]})" if data_seeds else "")
    raise JaxsaeError(
        f"{who}: non-finite loss at step {int(bad[i])}; stopped without "
        f"saving it. The last good checkpoint is step {last}: lower --lr or check the store "
        "for extreme activations, then rerun to resume from there")
