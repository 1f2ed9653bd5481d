"""Provider payload builders: webhook bodies and signatures as PayPal and Stripe send them."""
