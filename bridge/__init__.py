"""The bridge: Twilio phone calls ⇄ the Azure OpenAI Realtime model, with exact barge-in."""

__version__ = "0.1.0"
