"""Money: prices, the charge of one call, the usage ledger, budgets and reports.

- :mod:`~byok_plugin.billing.pricing`, :mod:`~byok_plugin.billing.catalog`: the price table and
  the model catalog (shipped data, LiteLLM's map, operator overrides);
- :mod:`~byok_plugin.billing.charges`: :class:`Billing`, what ``byok_compute_charge`` answers;
- :mod:`~byok_plugin.billing.ledger`, :mod:`~byok_plugin.billing.spool`: usage rows written in
  group commits, spooled to a local file while the store is down;
- :mod:`~byok_plugin.billing.budgets`: holds and settlements against workspace and organization
  budgets;
- :mod:`~byok_plugin.billing.usage_report`, :mod:`~byok_plugin.billing.reconcile`: summing the
  ledger, and checking it against the providers' own cost.

Money is :class:`decimal.Decimal`, never float.

May import: byok_plugin.core, byok_plugin.store, byok_plugin.keys, byok_plugin.settings.
"""
