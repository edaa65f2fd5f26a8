"""Report section parsing on the header variants real reports use."""

from __future__ import annotations

from llmclip.data.reports import ReportSections, normalize_text, parse_report

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_mimic_style_sections():
    r = parse_report(MIMIC_STYLE)
    assert r.indication == "___F with new onset ascites // eval for infection"
    assert r.comparison == "None."
    assert r.findings.startswith(
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral"
    )
    assert r.impression == "No acute cardiopulmonary process."
    assert r.history == ""
    assert "TECHNIQUE: Chest PA and lateral" in r.full  # kept in full, in no section
    assert "FINAL REPORT" not in r.full and "  " not in r.full and "\n" not in r.full


def test_header_variants_and_case():
    text = (
        "Clinical History: fever.\nReason for examination: cough\nComparisons: 2010\n"
        "Findings/Impression: small left effusion\nConclusion: effusion"
    )
    r = parse_report(text)
    assert (r.history, r.indication, r.comparison) == ("fever.", "cough", "2010")
    assert r.findings == "small left effusion"
    assert r.impression == "effusion"


def test_inline_uppercase_headers_and_mixed_case_inside_sentence():
    r = parse_report(
        "FINDINGS: Heart normal. Patient has history: none relevant. IMPRESSION: Normal."
    )
    assert r.findings == "Heart normal. Patient has history: none relevant."
    assert r.impression == "Normal."
    assert r.history == ""  # "history:" inside a sentence in lower case is not a header


def test_no_headers_is_all_findings_and_repeated_sections_join():
    assert parse_report("  sin hallazg patolog  .").findings == "sin hallazg patolog ."
    r = parse_report("FINDINGS: a.\nIMPRESSION: b.\nFINDINGS: c.")
    assert r.findings == "a. c." and r.impression == "b."


def test_placeholders_are_one_token():
    assert (
        normalize_text("Normal chest x-XXXXXX.  Seen  on XXXX")
        == "Normal chest x-XXXX. Seen on XXXX"
    )
    assert normalize_text("___ year old, dr. _____ was  paged") == "___ year old, dr. ___ was paged"


def test_from_parts_round_trips_through_parse_report():
    r = ReportSections.from_parts(
        findings=" Heart  size normal. ",
        impression="No acute disease.",
        indication="XXXX chest pain",
        comparison=None,
    )
    assert (
        r.full
        == "INDICATION: XXXX chest pain FINDINGS: Heart size normal. IMPRESSION: No acute disease."
    )
    back = parse_report(r.full)
    assert (back.findings, back.impression, back.indication) == (
        r.findings,
        r.impression,
        r.indication,
    )
    assert ReportSections.from_parts(indication="cough").is_empty
    assert not r.is_empty and r.findings_impression == "Heart size normal. No acute disease."
