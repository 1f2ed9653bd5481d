"""The payment and SMS providers: paypal/, stripe/ and twilio/ (verify, events, api or gateway
each), the only modules of core that import a vendor SDK (tests/unit/test_layering.py says
so). They hand provider-neutral events (events.py) and answers (ports.py) in; the rules of
money that apply them live flat at the top of core/."""
