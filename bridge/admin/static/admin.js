// Small progressive enhancements; every page works without them.
"use strict";

// Show only the turn-detection settings of the chosen type (without JS all are shown, each says
// which type it applies to).
function setUpTurnOptions() {
  const select = document.getElementById("turn_type");
  if (!select) return;
  const groups = document.querySelectorAll(".turn-options[data-turn]");
  const update = () => {
    groups.forEach((group) => { group.hidden = group.dataset.turn !== select.value; });
  };
  select.addEventListener("change", update);
  update();
}

// Hide the transcript language/model and the recording announcement while their box is unchecked.
function setUpDependent(boxId, fieldIds) {
  const box = document.getElementById(boxId);
  if (!box) return;
  const fields = fieldIds.map((id) => document.getElementById(id)).filter(Boolean).map((el) => el.closest(".field"));
  const update = () => {
    fields.forEach((field) => {
      // Keep a field with an error visible: its message must be seen.
      field.hidden = !box.checked && !field.classList.contains("invalid");
    });
  };
  box.addEventListener("change", update);
  update();
}

// Ask before a rollback, which saves a new version.
function setUpConfirm() {
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
}

// While a greeting renders, ask every two seconds whether it is done, then show the player.
function setUpGreetingPoll() {
  const box = document.getElementById("greeting-status");
  if (!box || box.dataset.state !== "rendering") return;
  const url = box.dataset.pollUrl;
  let tries = 0;
  const show = (state) => {
    box.replaceChildren();
    box.dataset.state = state.state;
    const p = document.createElement("p");
    if (state.state === "ready" && state.url) {
      p.textContent = "Listen before callers do:";
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "none";
      audio.src = state.url;
      box.append(p, audio);
      return;
    }
    if (state.state === "failed") {
      p.className = "error";
      p.textContent = "The greeting could not be rendered: " + state.message + " Reload the page to try again.";
    } else {
      p.className = "muted";
      p.textContent = "The greeting is not ready. Reload the page to check again.";
    }
    box.append(p);
  };
  const poll = async () => {
    tries += 1;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.ok) {
        const state = await response.json();
        if (state.state !== "rendering") { show(state); return; }
      }
    } catch (error) {
      // A network hiccup: try again below.
    }
    if (tries < 60) window.setTimeout(poll, 2000);
    else show({ state: "timeout" });
  };
  window.setTimeout(poll, 1500);
}

document.addEventListener("DOMContentLoaded", () => {
  setUpTurnOptions();
  setUpDependent("transcription", ["transcription_language", "transcription_model"]);
  setUpDependent("record_calls", ["consent_message"]);
  setUpConfirm();
  setUpGreetingPoll();
});
