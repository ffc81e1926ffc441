"""The numpy KPI core: exponential histogram, link KPIs, process KPIs."""
