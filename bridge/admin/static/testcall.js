/*
 * The in-browser test call of a prompt profile (bridge/admin/testcall.py is the server side).
 *
 * The page plays Twilio's part of a Media Stream (docs/protocols.md §1), so staff hear exactly what a
 * caller would:
 *   - microphone -> AudioWorklet (ScriptProcessor where there is none) -> windowed-sinc lowpass and
 *     decimation to 8 kHz -> G.711 μ-law -> `connected`, `start`, then 160-byte (20 ms) `media` frames;
 *   - incoming `media`: μ-law -> 8 kHz PCM -> band-limited interpolation to the AudioContext's rate ->
 *     played gaplessly in arrival order, a short jitter buffer ahead of the audio clock;
 *   - `mark`: echoed when playback (the audio clock) reaches the point where it was placed;
 *   - `clear`: everything scheduled is stopped and dropped, every pending mark echoed at once;
 *   - `call` (ours, not Twilio's): the CallSid the bridge chose for this test call ("test-…"), the id it
 *     is logged under (whatever our `start` said);
 *   - `transcript` (ours, not Twilio's): a line in the transcript list.
 *
 * This one file is also the AudioWorklet module (loaded by its own URL with addModule), because the admin
 * pages' Content-Security-Policy allows scripts from 'self' only: no inline or blob: modules.
 *
 * window.bridgeTestCall exposes counters for the browser tests (tests/test_browser.py).
 */
(function () {
  "use strict";

  /* ---------------------------------------------------- the worklet side (AudioWorkletGlobalScope) */

  if (typeof registerProcessor === "function" && typeof AudioWorkletProcessor === "function") {
    /** Hands the microphone's samples to the page in batches of `batch` frames (20 ms). */
    class CaptureProcessor extends AudioWorkletProcessor {
      constructor(options) {
        super();
        this.size = (options && options.processorOptions && options.processorOptions.batch) || 960;
        this.buf = new Float32Array(this.size);
        this.n = 0;
      }

      process(inputs) {
        const input = inputs[0];
        if (input && input.length > 0) {
          const channel = input[0];
          let i = 0;
          while (i < channel.length) {
            const take = Math.min(channel.length - i, this.size - this.n);
            this.buf.set(channel.subarray(i, i + take), this.n);
            this.n += take;
            i += take;
            if (this.n === this.size) {
              this.port.postMessage(this.buf, [this.buf.buffer]);
              this.buf = new Float32Array(this.size);
              this.n = 0;
            }
          }
        }
        return true;
      }
    }
    registerProcessor("bridge-capture", CaptureProcessor);
    return;
  }

  /* ---------------------------------------------------------------- the page side */

  const SCRIPT_URL = (document.currentScript && document.currentScript.src) || "/admin/static/testcall.js";
  const RATE = 8000; // G.711 on the phone network
  const FRAME_BYTES = 160; // 20 ms of μ-law, what Twilio sends per `media` message
  const JITTER_LEAD = 0.08; // s of audio scheduled ahead of the clock when playback starts from idle
  const TICK_MS = 10;

  /* ---- G.711 μ-law */

  const ULAW_BIAS = 0x84;
  const ULAW_SEGMENT_ENDS = [0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff];

  /**
   * One 16-bit linear sample -> one μ-law byte (G.711), computed on the 14-bit magnitude the standard
   * defines, so that it agrees bit for bit with the bridge's own encoder (audioop).
   */
  function linearToUlaw(sample) {
    let v = (sample | 0) >> 2; // 14 bits, rounded toward -inf
    let mask = 0xff;
    if (v < 0) {
      v = -v;
      mask = 0x7f;
    }
    if (v > 8159) v = 8159;
    v += ULAW_BIAS >> 2;
    let segment = 0;
    while (segment < 8 && v > ULAW_SEGMENT_ENDS[segment]) segment++;
    if (segment >= 8) return 0x7f ^ mask;
    return ((segment << 4) | ((v >> (segment + 1)) & 0x0f)) ^ mask;
  }

  /** One μ-law byte -> one 16-bit linear sample (G.711). */
  function ulawToLinear(byte) {
    const u = ~byte & 0xff;
    const exponent = (u >> 4) & 0x07;
    const magnitude = ((((u & 0x0f) << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS;
    return u & 0x80 ? -magnitude : magnitude;
  }

  const ULAW_DECODE = new Float32Array(256);
  for (let i = 0; i < 256; i++) ULAW_DECODE[i] = ulawToLinear(i) / 32768;

  function base64ToBytes(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  function bytesToBase64(bytes) {
    let binary = "";
    for (let i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
    return btoa(binary);
  }

  /* ---- band-limited resampling: a Kaiser-windowed sinc, tabulated finely and linearly interpolated */

  function besselI0(x) {
    let sum = 1;
    let term = 1;
    for (let k = 1; k < 50; k++) {
      term *= (x / (2 * k)) * (x / (2 * k));
      sum += term;
      if (term < sum * 1e-12) break;
    }
    return sum;
  }

  /**
   * The lowpass kernel h(τ) = ρ·sinc(ρτ)·kaiser(τ/W), τ in *input* samples, for a cutoff of `cutoff` Hz
   * at input rate `inRate` (ρ = 2·cutoff/inRate). Its sum over the integers is 1, so the same kernel
   * decimates (ρ < 1: the lowpass removes what would alias) and interpolates (ρ ≈ 1: the reconstruction
   * filter of the 8 kHz signal).
   */
  function makeKernel(cutoff, inRate, zeroCrossings, beta) {
    const rho = (2 * cutoff) / inRate;
    const halfWidth = zeroCrossings / rho;
    const steps = 512; // table entries per input sample
    const size = Math.ceil(halfWidth * steps) + 2;
    const table = new Float32Array(size);
    const norm = besselI0(beta);
    for (let j = 0; j < size; j++) {
      const tau = j / steps;
      if (tau >= halfWidth) break;
      const x = Math.PI * rho * tau;
      const sinc = x === 0 ? 1 : Math.sin(x) / x;
      const r = tau / halfWidth;
      table[j] = (rho * sinc * besselI0(beta * Math.sqrt(1 - r * r))) / norm;
    }
    return {
      halfWidth,
      at(tau) {
        const a = Math.abs(tau) * steps;
        const i = a | 0;
        if (i + 1 >= size) return 0;
        const f = a - i;
        return table[i] + f * (table[i + 1] - table[i]);
      },
    };
  }

  /** Streaming decimation of the microphone (any rate) to 8 kHz, lowpassed at 3.6 kHz (telephone band). */
  class Downsampler {
    constructor(inRate) {
      this.step = inRate / RATE;
      this.kernel = makeKernel(3600, inRate, 32, 8);
      const w = Math.ceil(this.kernel.halfWidth) + 1;
      this.buf = new Float32Array(w); // zeros: the history before the first sample
      this.t = w; // the next output's position, in input samples from buf[0]
    }

    /** Feed input samples; returns the 8 kHz samples that are complete. */
    push(input) {
      const joined = new Float32Array(this.buf.length + input.length);
      joined.set(this.buf);
      joined.set(input, this.buf.length);
      const buf = joined;
      const w = this.kernel.halfWidth;
      const out = [];
      let t = this.t;
      while (t + w < buf.length - 1) {
        const first = Math.ceil(t - w);
        const last = Math.floor(t + w);
        let acc = 0;
        for (let k = first; k <= last; k++) acc += buf[k] * this.kernel.at(t - k);
        out.push(acc);
        t += this.step;
      }
      const drop = Math.max(0, Math.floor(t - w) - 1);
      this.buf = buf.slice(drop);
      this.t = t - drop;
      return Float32Array.from(out);
    }
  }

  /* ---- playback: Twilio's outbound buffer, emulated on the audio clock */

  /**
   * Plays 8 kHz μ-law in arrival order. Each chunk is interpolated by overlap-add: its samples'
   * contributions cover its own span plus the kernel's half-width either side, and the overlapping tails of
   * neighbouring chunks are summed by the audio graph, so the result equals one continuous interpolation
   * of the whole stream (no edge clicks), with no look-ahead delay. A "run" is audio played back to back;
   * when the queue has run dry (or after a `clear`), the next chunk starts a new run JITTER_LEAD ahead.
   */
  class Player {
    constructor(ctx, output, callbacks) {
      this.ctx = ctx;
      this.output = output;
      this.callbacks = callbacks; // {echo(name, played)}
      this.rate = ctx.sampleRate;
      this.ratio = this.rate / RATE; // output frames per input sample
      this.kernel = makeKernel(3900, RATE, 16, 8);
      this.anchor = null; // output frame at which input sample 0 of the current run plays
      this.count = 0; // input samples in the current run
      this.sources = new Set();
      this.spans = []; // nominal [start, end) seconds of each scheduled chunk, for the played counter
      this.pending = []; // marks waiting for playback: {name, time}
      this.playedDone = 0;
      this.segments = []; // seconds played per run
    }

    /** The audio clock, corrected for the output latency the browser reports: what is being heard now. */
    heardNow() {
      const latency = Number.isFinite(this.ctx.outputLatency) ? this.ctx.outputLatency : 0;
      return this.ctx.currentTime - latency;
    }

    /** When the audio received so far ends (seconds on the audio clock), or 0 with nothing scheduled. */
    endTime() {
      return this.anchor === null ? 0 : (this.anchor + this.count * this.ratio) / this.rate;
    }

    enqueue(ulaw) {
      const now = this.ctx.currentTime;
      if (this.anchor === null || this.endTime() < now + 0.01) {
        // Idle or ran dry: start a new run a little ahead, so network jitter does not starve it.
        const ramp = Math.ceil(this.kernel.halfWidth * this.ratio);
        this.anchor = Math.ceil((now + JITTER_LEAD) * this.rate) + ramp;
        this.count = 0;
        this.segments.push(0);
      }
      const n = ulaw.length;
      const x = new Float32Array(n);
      for (let i = 0; i < n; i++) x[i] = ULAW_DECODE[ulaw[i]];
      const i0 = this.count;
      const i1 = i0 + n;
      const w = this.kernel.halfWidth;
      const ratio = this.ratio;
      const first = this.anchor + Math.ceil((i0 - w) * ratio);
      const last = this.anchor + Math.floor((i1 - 1 + w) * ratio);
      const out = new Float32Array(last - first + 1);
      for (let f = first; f <= last; f++) {
        const tau = (f - this.anchor) / ratio;
        const k0 = Math.max(i0, Math.ceil(tau - w));
        const k1 = Math.min(i1 - 1, Math.floor(tau + w));
        let acc = 0;
        for (let k = k0; k <= k1; k++) acc += x[k - i0] * this.kernel.at(tau - k);
        out[f - first] = acc;
      }
      const buffer = this.ctx.createBuffer(1, out.length, this.rate);
      buffer.copyToChannel(out, 0);
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.output);
      source.onended = () => {
        source.disconnect();
        this.sources.delete(source);
      };
      this.sources.add(source);
      source.start(first / this.rate);
      this.spans.push({
        start: (this.anchor + i0 * ratio) / this.rate,
        end: (this.anchor + i1 * ratio) / this.rate,
        run: this.segments.length - 1,
      });
      this.count = i1;
    }

    /** A `mark`: echoed once playback reaches the end of the audio received before it. */
    mark(name) {
      const time = this.endTime();
      if (time <= this.heardNow() && this.pending.length === 0) {
        this.callbacks.echo(name, true);
      } else {
        this.pending.push({ name, time });
      }
    }

    /** A `clear`: drop everything scheduled and echo every pending mark now (flushed, not played). */
    clear() {
      const now = this.heardNow();
      for (const source of this.sources) {
        source.onended = null;
        try {
          source.stop();
        } catch (e) {
          /* never started: nothing to stop */
        }
        source.disconnect();
      }
      this.sources.clear();
      for (const span of this.spans) this.credit(span, Math.max(0, Math.min(now, span.end) - span.start));
      this.spans = [];
      const flushed = this.pending;
      this.pending = [];
      for (const m of flushed) this.callbacks.echo(m.name, false);
      this.anchor = null;
      this.count = 0;
    }

    credit(span, seconds) {
      this.playedDone += seconds;
      this.segments[span.run] += seconds;
    }

    /** Called every few ms: echo the marks playback has reached, count what has been played. */
    tick() {
      const now = this.heardNow();
      while (this.pending.length > 0 && this.pending[0].time <= now) {
        this.callbacks.echo(this.pending.shift().name, true);
      }
      while (this.spans.length > 0 && this.spans[0].end <= now) {
        const span = this.spans.shift();
        this.credit(span, span.end - span.start);
      }
    }

    secondsPlayed() {
      const now = this.heardNow();
      let live = 0;
      for (const span of this.spans) live += Math.max(0, Math.min(now, span.end) - span.start);
      return this.playedDone + live;
    }

    /** Seconds of audio still to be played (scheduled beyond now). */
    backlog() {
      return Math.max(0, this.endTime() - this.ctx.currentTime);
    }
  }

  /* ---- the call */

  function hex(bytes) {
    const a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function levelOf(samples) {
    let sum = 0;
    for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
    const rms = Math.sqrt(sum / Math.max(1, samples.length));
    const db = 20 * Math.log10(rms + 1e-9);
    return Math.max(0, Math.min(1, (db + 60) / 60)); // -60 dBFS .. 0 dBFS
  }

  function micMessage(error) {
    const name = error && error.name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      return (
        "Microphone access was denied. Allow the microphone for this site (the icon in the address bar), " +
        "then try again."
      );
    }
    if (name === "NotFoundError" || name === "OverconstrainedError") {
      return "No microphone was found. Plug one in, then try again.";
    }
    if (name === "NotReadableError" || name === "AbortError") {
      return "The microphone could not be opened: another program may be using it.";
    }
    return "The microphone could not be opened: " + ((error && error.message) || String(error)) + ".";
  }

  /** The per-call counters, as they are before a call: reset at every new call. */
  function freshCounters() {
    return {
      error: null,
      framesSent: 0,
      mediaReceived: 0,
      bytesReceived: 0,
      marksReceived: 0,
      marksEchoed: 0,
      marksPlayed: 0,
      marksFlushed: 0,
      clears: 0,
      transcripts: [],
      closeCode: null,
      closeReason: "",
    };
  }

  const stats = {
    state: "idle", // idle, connecting, live, ended, failed
    ...freshCounters(),
    callSid: null,
    sampleRate: null,
    capture: null, // "worklet" or "script-processor"
    /** Seconds of the bridge's audio played (flushed audio is not counted). */
    get secondsPlayed() {
      return activePlayer ? activePlayer.secondsPlayed() : 0;
    },
    /** Seconds played per run of back-to-back audio: [greeting, first answer, …] on an echo model. */
    get segments() {
      return activePlayer ? activePlayer.segments.slice() : [];
    },
    /** Seconds of audio scheduled but not yet played. */
    get backlog() {
      return activePlayer ? activePlayer.backlog() : 0;
    },
  };
  let activePlayer = null; // the player of the current (or last) call

  function setup(section) {
    const doc = section.ownerDocument;
    const el = (tag, attrs, text) => {
      const node = doc.createElement(tag);
      for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
      if (text) node.textContent = text;
      return node;
    };

    // The page may already give the section its heading and explanation; add them only if it does not.
    if (!section.querySelector("h2")) section.append(el("h2", {}, "Test call"));
    if (!section.querySelector("p")) {
      section.append(
        el(
          "p",
          { class: "test-call-help" },
          "Talk to this profile through your microphone, exactly as a caller would hear it (8 kHz phone " +
            "quality). Test calls use the latest saved version and appear in the call log.",
        ),
      );
    }
    const callButton = el("button", { type: "button", class: "test-call-start" }, "Call this profile");
    const hangButton = el("button", { type: "button", class: "test-call-hangup", disabled: "" }, "Hang up");
    const controls = el("div", { class: "test-call-controls" });
    controls.append(callButton, " ", hangButton);
    const status = el(
      "p",
      { class: "test-call-status", role: "status", "aria-live": "polite" },
      "Not connected.",
    );
    const micMeter = el("meter", { min: "0", max: "1", value: "0", id: "test-call-mic-level" });
    const outMeter = el("meter", { min: "0", max: "1", value: "0", id: "test-call-bridge-level" });
    const meters = el("div", { class: "test-call-levels" });
    const micRow = el("div", { class: "test-call-level" });
    micRow.append(el("label", { for: "test-call-mic-level" }, "Your microphone"), " ", micMeter);
    const outRow = el("div", { class: "test-call-level" });
    outRow.append(el("label", { for: "test-call-bridge-level" }, "What you hear"), " ", outMeter);
    meters.append(micRow, outRow);
    const transcriptHeading = el("h3", { id: "test-call-transcript-heading" }, "Transcript");
    const transcript = el("ol", {
      class: "test-call-transcript",
      "aria-labelledby": "test-call-transcript-heading",
    });
    section.append(controls, status, meters, transcriptHeading, transcript);

    let call = null; // the live call's resources

    function show(text, isError) {
      status.textContent = text;
      status.classList.toggle("error", Boolean(isError));
      status.setAttribute("role", isError ? "alert" : "status");
    }

    function setButtons(inCall) {
      callButton.disabled = inCall;
      hangButton.disabled = !inCall;
    }

    function fail(message) {
      stats.state = "failed";
      stats.error = message;
      show(message, true);
      teardown(true);
    }

    function addTranscript(role, text) {
      stats.transcripts.push({ role, text });
      const item = el("li", { class: "transcript-" + role });
      const who = role === "assistant" ? "Assistant" : role === "caller" ? "Caller" : role;
      item.append(el("strong", {}, who + ": "));
      item.append(doc.createTextNode(text));
      transcript.append(item);
    }

    function socketUrl() {
      // Read at each call: the page may have been given a new token since it loaded.
      const profileId = section.dataset.profileId || "";
      const path = section.dataset.wsUrl || "/admin/test-call?profile=" + encodeURIComponent(profileId);
      const url = new URL(path, window.location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      url.searchParams.set("csrf", section.dataset.csrf || "");
      return url.toString();
    }

    async function startCapture(ctx, source, onSamples) {
      if (typeof AudioWorkletNode === "function" && ctx.audioWorklet) {
        try {
          await ctx.audioWorklet.addModule(SCRIPT_URL);
          const node = new AudioWorkletNode(ctx, "bridge-capture", {
            numberOfInputs: 1,
            numberOfOutputs: 1,
            outputChannelCount: [1],
            channelCount: 1,
            channelCountMode: "explicit",
            processorOptions: { batch: Math.round(ctx.sampleRate / 50) },
          });
          node.port.onmessage = (event) => onSamples(event.data);
          source.connect(node);
          stats.capture = "worklet";
          return node;
        } catch (e) {
          console.warn("test call: AudioWorklet unavailable, using ScriptProcessor", e);
        }
      }
      const node = ctx.createScriptProcessor(1024, 1, 1);
      node.onaudioprocess = (event) => onSamples(new Float32Array(event.inputBuffer.getChannelData(0)));
      source.connect(node);
      stats.capture = "script-processor";
      return node;
    }

    async function start() {
      if (call) return;
      Object.assign(stats, { state: "connecting", ...freshCounters() });
      transcript.replaceChildren();
      setButtons(true);
      const ids = {
        streamSid: "MZ" + hex(16),
        callSid: "CA" + hex(16), // a placeholder for the start message: the bridge sends the real one
        accountSid: "AC" + hex(16),
      };
      stats.callSid = null;
      call = { ids, ws: null, stream: null, ctx: null, sequence: 0, chunk: 0, live: false };
      const current = call;

      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        fail("This page cannot use a microphone: open the admin UI over https (or on localhost).");
        return;
      }
      // The audio context first, while the click still counts as the user's gesture (autoplay policy).
      const ctx = new AudioContext({ latencyHint: "interactive" });
      current.ctx = ctx;
      stats.sampleRate = ctx.sampleRate;
      const resumed = ctx.resume().catch(() => {});

      show("Asking for the microphone…");
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
        });
      } catch (e) {
        if (call === current) fail(micMessage(e));
        return;
      }
      if (call !== current) {
        stream.getTracks().forEach((t) => t.stop());
        return;
      }
      current.stream = stream;
      await resumed;
      const mix = ctx.createGain();
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 1024;
      mix.connect(analyser);
      analyser.connect(ctx.destination);
      const player = new Player(ctx, mix, {
        echo(name, played) {
          const sequenceNumber = String(++current.sequence);
          send({ event: "mark", sequenceNumber, streamSid: ids.streamSid, mark: { name } });
          stats.marksEchoed++;
          if (played) stats.marksPlayed++;
          else stats.marksFlushed++;
        },
      });
      current.player = player;
      activePlayer = player;

      // Capture: microphone -> 8 kHz -> μ-law -> 20 ms frames (sent only once the call is live).
      const downsampler = new Downsampler(ctx.sampleRate);
      const frame = new Uint8Array(FRAME_BYTES);
      let filled = 0;
      const frameSamples = new Float32Array(FRAME_BYTES);
      const onSamples = (samples) => {
        if (call !== current) return;
        const narrow = downsampler.push(samples);
        for (let i = 0; i < narrow.length; i++) {
          const v = Math.max(-1, Math.min(1, narrow[i]));
          frameSamples[filled] = v;
          frame[filled++] = linearToUlaw(Math.round(v * 32767));
          if (filled === FRAME_BYTES) {
            filled = 0;
            micMeter.value = levelOf(frameSamples);
            if (current.live) sendMedia(frame);
          }
        }
      };
      const source = ctx.createMediaStreamSource(stream);
      let captureNode;
      try {
        captureNode = await startCapture(ctx, source, onSamples);
      } catch (e) {
        if (call === current) fail("The microphone could not be read: " + (e.message || e) + ".");
        return;
      }
      if (call !== current) return;
      // Keep the capture node pulled by the graph without hearing it.
      const mute = ctx.createGain();
      mute.gain.value = 0;
      captureNode.connect(mute);
      mute.connect(ctx.destination);
      current.nodes = [source, captureNode, mute, mix, analyser];

      function sendMedia(bytes) {
        current.chunk++;
        send({
          event: "media",
          sequenceNumber: String(++current.sequence),
          media: {
            track: "inbound",
            chunk: String(current.chunk),
            timestamp: String((current.chunk - 1) * 20),
            payload: bytesToBase64(bytes),
          },
          streamSid: ids.streamSid,
        });
        stats.framesSent++;
      }

      function send(message) {
        const ws = current.ws;
        if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
      }
      current.send = send;

      show("Connecting to the bridge…");
      let ws;
      try {
        ws = new WebSocket(socketUrl());
      } catch (e) {
        fail("The test call could not be started: " + (e.message || e) + ".");
        return;
      }
      current.ws = ws;
      ws.onopen = () => {
        if (call !== current) return;
        send({ event: "connected", protocol: "Call", version: "1.0.0" });
        send({
          event: "start",
          sequenceNumber: String(++current.sequence),
          start: {
            accountSid: ids.accountSid,
            streamSid: ids.streamSid,
            callSid: ids.callSid,
            tracks: ["inbound"],
            customParameters: {},
            mediaFormat: { encoding: "audio/x-mulaw", sampleRate: RATE, channels: 1 },
          },
          streamSid: ids.streamSid,
        });
        current.live = true;
        stats.state = "live";
        show("Connected: speak now. You hear the bridge as a caller would (8 kHz phone audio).");
      };
      ws.onmessage = (event) => {
        if (call !== current || typeof event.data !== "string") return;
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (e) {
          console.warn("test call: a message that is not JSON", e);
          return;
        }
        switch (message.event) {
          case "media": {
            const bytes = base64ToBytes((message.media && message.media.payload) || "");
            stats.mediaReceived++;
            stats.bytesReceived += bytes.length;
            if (bytes.length > 0) player.enqueue(bytes);
            break;
          }
          case "mark":
            stats.marksReceived++;
            player.mark(String((message.mark && message.mark.name) || ""));
            break;
          case "clear":
            stats.clears++;
            player.clear();
            break;
          case "call":
            // The bridge chooses the test call's CallSid ("test-…"): the one it is logged under.
            if (typeof message.callSid === "string" && message.callSid) {
              current.ids.callSid = message.callSid;
              stats.callSid = message.callSid;
            }
            break;
          case "transcript":
            addTranscript(String(message.role || ""), String(message.text || ""));
            break;
          default:
            console.warn("test call: ignoring an unknown message", message.event);
        }
      };
      ws.onclose = (event) => {
        if (call !== current) return;
        stats.closeCode = event.code;
        stats.closeReason = event.reason || "";
        if (!current.live) {
          fail(
            "The bridge refused the test call" +
              (event.reason ? ": " + event.reason : "") +
              ". Reload the page (you may have been signed out) and try again.",
          );
          return;
        }
        stats.state = "ended";
        const normal = event.code === 1000 || event.code === 1005;
        const why = normal ? "" : " (" + (event.reason || "code " + event.code) + ")";
        show("The bridge ended the call" + why + ".", !normal);
        teardown(false);
      };
      ws.onerror = () => {
        /* onclose follows with the details */
      };

      const heard = new Float32Array(analyser.fftSize);
      current.timer = setInterval(() => {
        player.tick();
        analyser.getFloatTimeDomainData(heard);
        outMeter.value = levelOf(heard);
      }, TICK_MS);
    }

    function hangUp() {
      const current = call;
      if (!current) return;
      if (current.live && current.send) {
        current.send({
          event: "stop",
          sequenceNumber: String(++current.sequence),
          streamSid: current.ids.streamSid,
          stop: { accountSid: current.ids.accountSid, callSid: current.ids.callSid },
        });
      }
      stats.state = "ended";
      show("You hung up.");
      teardown(true);
    }

    /** Release the call: the socket, the microphone; the audio at once (`now`) or once played out. */
    function teardown(now) {
      const current = call;
      if (!current) return;
      call = null;
      current.live = false;
      setButtons(false);
      if (current.ws && current.ws.readyState <= WebSocket.OPEN) current.ws.close(1000, "hung up");
      if (current.stream) current.stream.getTracks().forEach((t) => t.stop());
      micMeter.value = 0;
      const finish = () => {
        if (current.timer) clearInterval(current.timer);
        if (current.player) current.player.tick();
        for (const node of current.nodes || []) node.disconnect();
        if (current.ctx && current.ctx.state !== "closed") current.ctx.close().catch(() => {});
        outMeter.value = 0;
      };
      const rest = current.player && !now ? current.player.backlog() : 0;
      if (rest > 0) setTimeout(finish, Math.min(rest, 10) * 1000 + 50);
      else finish();
    }

    callButton.addEventListener("click", () => {
      start().catch((e) => fail("The test call failed: " + (e.message || e) + "."));
    });
    hangButton.addEventListener("click", hangUp);
    window.addEventListener("pagehide", hangUp);
  }

  window.bridgeTestCall = stats;
  // The signal path, for the browser tests (the codec against G.711, the filters' response); the page
  // itself does not use this.
  Object.defineProperty(stats, "dsp", {
    value: { linearToUlaw, ulawToLinear, Downsampler, Player },
    enumerable: false,
  });

  function init() {
    const section = document.getElementById("test-call");
    if (section) setup(section);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
