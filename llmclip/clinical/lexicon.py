"""Radiology vocabulary: observation phrases, negation/uncertainty cues, abbreviations, synonyms.

Everything here is data (regex fragments and word lists); ``patterns.py`` compiles it once at import.
The observation phrases follow the CheXpert labeler's mention lists, extended for the wording of
North-American chest radiograph reports (Open-I / MIMIC style), common misspellings and the
anonymisation placeholder ``XXXX``. Regex fragments are case-insensitive and get ``\\b`` on both
sides when compiled.
"""

from __future__ import annotations

CHEXPERT_CLASSES: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]

NF, ECM, CM, LL, LO, ED, CO, PNA, AT, PTX, EFF, PO, FX, SD = CHEXPERT_CLASSES

# (observations, canonical term, regex). A term may stand for several observations
# ("hydropneumothorax"). Order matters only where two phrases start at the same character: the
# longer / more specific phrase comes first.
TERMS: list[tuple[tuple[str, ...], str, str]] = [
    # --- No Finding: "no acute cardiopulmonary process" is a *positive* No Finding mention; the
    # labeler inverts the status of these phrases (see labeler._INVERT).
    (
        (NF,),
        "acute cardiopulmonary abnormality",
        r"acute (?:(?:cardiopulmonary|cardio-pulmonary|pulmonary|intrathoracic|thoracic|chest|"
        r"radiographic|cardiac or pulmonary|cardiac|lung|osseous or cardiopulmonary) )*"
        r"(?:abnormalit(?:y|ies)|disease|process(?:es)?|findings?|pathology|pathologic findings?)",
    ),
    ((NF,), "active disease", r"active (?:cardiopulmonary |pulmonary |lung )?disease"),
    # --- Enlarged Cardiomediastinum
    (
        (ECM,),
        "widened mediastinum",
        r"(?:widened|widening of (?:the )?|enlarged|enlargement of (?:the )?)(?:superior )?"
        r"(?:mediastinum|mediastinal (?:silhouette|contours?|shadow|width))",
    ),
    ((ECM,), "mediastinal widening", r"mediastinal (?:widening|enlargement|prominence)"),
    # --- Cardiomegaly
    ((CM,), "cardiomegaly", r"cardiomegal(?:y|ly|ic)|cardiac megaly"),
    (
        (CM,),
        "enlarged heart",
        r"(?:enlarged|large|prominent|globular) (?:heart|cardiac (?:silhouette|shadow|size|contours?))"
        r"(?: size)?|(?:cardiac|heart) enlargement|enlargement of (?:the )?(?:heart|cardiac "
        r"(?:silhouette|shadow))",
    ),
    # --- Lung Lesion
    (
        (LL, LO),
        "nodular opacity",
        r"(?:nodular|rounded|round|masslike|mass-like) (?:densit(?:y|ies)|opacit(?:y|ies)|"
        r"opacification)|nodular (?:infiltrates?|consolidation)",
    ),
    ((LL,), "nodule", r"(?:micro)?nodules?|nodular lesions?|nodularit(?:y|ies)"),
    ((LL,), "mass", r"mass(?:es)?(?! effect)|mass lesions?|masslike|mass-like"),
    (
        (LL,),
        "tumor",
        r"tumou?rs?|neoplasms?|neoplastic|carcinomas?|malignanc(?:y|ies)|metastas[ie]s|metastatic "
        r"disease|(?:lung|pulmonary|cavitary|cavitating|parenchymal|spiculated) lesions?",
    ),
    # --- Pneumothorax / effusion (hydropneumothorax first: it names both)
    ((PTX, EFF), "hydropneumothorax", r"hydro-?pneumothora(?:x|ces)|hemopneumothorax"),
    ((PTX,), "pneumothorax", r"pneumo-?thora(?:x|ces|xes)|pneumothoraxes|ptx|pleural air"),
    # --- Pleural Other before Pleural Effusion so "pleural thickening" is not read as effusion
    (
        (PO,),
        "pleural thickening",
        r"pleural (?:thickening|scarring|scar|plaques?|calcifications?|reaction|fibrosis)|"
        r"pleural[- ]parenchymal (?:scarring|scar|thickening|changes?)|pleuroparenchymal "
        r"(?:scarring|scar|thickening|changes?)|fibrothorax|(?:apical )?pleural cap(?:ping|s)?|"
        r"apical cap(?:ping|s)?|thickening of (?:the )?pleura|calcified pleura|(?:fissural|fissure) "
        r"thickening|thicken(?:ed|ing) (?:of |in )?(?:the )?(?:\w+ )?fissures?|pleural "
        r"(?:abnormalit(?:y|ies)|disease)|(?:calcified )?pleural plaques?",
    ),
    (
        (EFF,),
        "pleural effusion",
        r"(?:pleural )?eff?usions?|pleural fluid|hydrothorax|fluid in (?:the )?(?:(?:right|left|minor|major"
        r"|horizontal) )?(?:fissure|pleural space)|subpulmonic (?:effusion|fluid)|"
        r"loculated fluid|layering fluid",
    ),
    # --- Edema
    (
        (ED,),
        "pulmonary edema",
        r"(?:pulmonary |interstitial |alveolar |airspace |perihilar )?oedema|(?<!soft tissue )"
        r"(?<!subcutaneous )edema(?:tous)?|(?:(?:vascular|venous|pulmonary|vasculature|perihilar) )?"
        r"(?:congestion|engorgement)|(?:congestive )?(?:heart|cardiac) failure|chf|fluid overload|"
        r"cephalization|kerley b? ?lines|(?:vascular|vasculature|vascularity) (?:indistinctness|"
        r"plethora|prominence|redistribution|congestive changes?)|congestive changes?|"
        r"(?:pulmonary )?venous hypertension|(?:early|cardiac|heart|left heart|overt) failure|"
        r"(?:prominent|prominence of (?:the )?|engorged|increased|indistinct|distended) (?:central )?"
        r"(?:pulmonary |lung )?(?:vasculature|vascularity|vessels|vascular markings)",
    ),
    # --- Consolidation / pneumonia
    ((CO,), "consolidation", r"consolidat(?:ion|ions|ive|ed|ing)"),
    (
        (PNA,),
        "pneumonia",
        r"pneumonias?|pneumonitis|bronchopneumonia|pna|(?<!granulomatous )(?<!prior )(?<!old )"
        r"(?<!tuberculous )(?<!tuberculosis )(?<!previous )(?<!remote )(?<!fungal )infections?|infectious (?:process|etiology|"
        r"disease|infiltrate)|aspiration",
    ),
    # --- Atelectasis
    (
        (AT,),
        "atelectasis",
        r"atelecta(?:sis|ses|tic)|atelctasis|atelectsis|atalectasis|ateletasis|"
        r"(?:lobar|lung|lobe|segmental|subsegmental) collapse|collapsed? (?:lung|lobe)",
    ),
    # --- Lung Opacity (broad, as in CheXpert: opacities, infiltrates, densities, airspace disease,
    # interstitial markings, scarring)
    (
        (LO,),
        "opacity",
        r"opacit(?:y|ies)|opacification|opacified|infiltrat(?:e|es|ion|ive)|(?<!bone )"
        r"(?<!bony )densit(?:y|ies)|air[- ]?space (?:disease|process|filling|opacit(?:y|ies))|"
        r"haz(?:e|iness|y opacit(?:y|ies))|ground[- ]glass|(?:interstitial|reticular|"
        r"reticulonodular|coarse(?:ned)?) (?:markings?|prominence|pattern|changes?|lung disease|"
        r"thickening|opacities)|increased (?:interstitial |lung |pulmonary )?markings|reticulation|"
        r"(?:parenchymal |pulmonary |lung |linear |apical |basilar |streaky )?scar(?:ring|s)?|"
        r"fibrotic changes?|fibrosis",
    ),
    # --- Fracture
    ((FX,), "fracture", r"fractures?|fractured|fx|fxs"),
    # --- Support Devices: tubes, lines, catheters, implanted devices, surgical hardware
    (
        (SD,),
        "pacemaker",
        r"pacemakers?|pacers?|pacing (?:device|leads?|wires?|generator)|(?:cardiac |transvenous )?"
        r"(?:pacemaker |pacer |icd |defibrillator )?leads?|icds?|aicds?|defibrillators?|"
        r"(?:loop|cardiac) recorders?|generator (?:pack|device)",
    ),
    (
        (SD,),
        "central line",
        r"(?:central venous|central|venous|picc|pic|port|swan[- ]ganz|pulmonary artery|arterial|"
        r"dialysis|hemodialysis|(?:internal )?jugular|subclavian|midline|catheter) "
        r"(?:lines?|catheters?)|piccs?|port-?a-?caths?|portacaths?|mediports?|power ?ports?|"
        r"(?:chest|venous|infusion|right chest|left chest|subcutaneous) ports?|catheters?|"
        r"xxxx-a-xxxx|lines? and tubes?|(?:(?:right|left)(?:-sided)? )?chest (?:wall )?xxxx|"
        # the device word is often anonymised ("XXXX"): a tip in a central vein is a catheter's
        r"(?:its |the |distal |catheter )?tips? (?:is |are |now )?(?:at|in|within|overlying|over|near|"
        r"approximating|projecting over|projects over|terminat\w+ (?:in|at|within|over))(?: the)?"
        r"(?: level of the)?(?: (?:high|mid|distal|upper|lower|proximal|expected))? (?:svc|superior "
        r"vena cava|cavoatrial junction|cavo-atrial junction|caval atrial junction|cavoatrial|"
        r"right atrium|atriocaval junction|brachiocephalic vein)",
    ),
    (
        (SD,),
        "tube",
        r"(?:endotracheal|et|nasogastric|ng|orogastric|og|enteric|feeding|dobhoff|gastric|chest|"
        r"thoracostomy|tracheostomy|trach|g-|j-|gastrostomy|pigtail) ?tubes?|tracheostomy|ett|ngt|ogt|"
        r"(?:pleural |chest |surgical |mediastinal )?drains?|pleurx",
    ),
    (
        (SD,),
        "sternotomy wires",
        r"(?:median |midline )?sternotomy(?: wires?| sutures?| clips?)?|sternal (?:wires?|sutures?|"
        r"clips?)|cerclage wires?",
    ),
    (
        (SD,),
        "surgical clips",
        r"(?:surgical|vascular|cholecystectomy|metallic|postsurgical|post-surgical|axillary) clips?|"
        r"clips|staples?|suture (?:material|line)s?|surgical (?:sutures?|hardware|material)",
    ),
    (
        (SD,),
        "prosthetic valve",
        r"(?:prosthetic|mechanical|bioprosthetic|artificial) (?:aortic |mitral )?valves?|"
        r"(?:aortic|mitral|tricuspid) valve (?:replacement|prosthesis|repair|annuloplasty)|"
        r"valve replacement|annuloplasty ring",
    ),
    ((SD,), "stent", r"stents?|stent-?grafts?|endografts?|ivc filters?"),
    (
        (SD,),
        "orthopedic hardware",
        r"(?:orthopedic |orthopaedic |fixation |spinal fusion |fusion |postoperative |metallic )?"
        r"hardware|fixation (?:plates?|screws?|rods?|devices?)|(?:pedicle |surgical )?screws|plates? "
        r"and screws|spinal (?:fusion|rods?)|(?:cervical|thoracic|lumbar|cervicothoracic|anterior|"
        r"posterior) (?:spine |spinal |cervical |thoracic |lumbar )?fusion(?! anomal)|fusion (?:hardware|xxxx)|(?:intramedullary |harrington )?rods?|arthroplast(?:y|ies)"
        r"|(?:shoulder|humeral) (?:prosthesis|replacement)",
    ),
    (
        (SD,),
        "medical device",
        r"(?:support|monitoring|medical|implanted|implantable|cardiac|electronic) (?:devices?|"
        r"apparatus|equipment)|(?:ecg|ekg|telemetry) (?:leads?|wires?)|devices?|coils?|"
        r"balloon pump|iabp|lvad|left ventricular assist device|impella|ecmo (?:cannula)?|cannulas?|"
        r"(?:neuro|nerve |spinal cord |spinal |vagal nerve |vagus nerve )?stimulators?|"
        r"(?:cardiac |pacemaker |pacer |battery |xxxx )?generator|ivc xxxx|surgical xxxx|"
        r"bone anchors?|(?:closure|occluder) devices?|septal occluder",
    ),
]

# Subject + predicate phrases ("the heart is mildly enlarged", "heart size is normal") and prefixed
# phrases ("normal heart size", "enlarged cardiac silhouette"). The predicate word decides the
# status: POSITIVE words -> present, NORMAL words -> absent, BORDERLINE words -> uncertain. For the
# "chest" subject (No Finding), "normal" means No Finding present and "abnormal" means absent.
# negate() flips a predicate by replacing its word (normal <-> enlarged / abnormal).
PREDICATE_SUBJECTS: list[tuple[tuple[str, ...], str, str]] = [
    (
        (CM, ECM),
        "cardiomediastinal silhouette",
        r"(?:the )?(?:heart size|cardiac size|heart|cardiac silhouette) and (?:the )?mediastinal "
        r"(?:contours?|silhouettes?|width)|"
        r"(?:the )?(?:cardiac and mediastinal|heart and mediastinal|mediastinal and cardiac|"
        r"cardiomediastinal|cardio-mediastinal|cardiomedistinal) (?:silhouettes?|contours?|shadows?|"
        r"size|structures)|(?:the )?heart and mediastinum",
    ),
    (
        (ECM,),
        "mediastinum",
        r"(?:the )?mediastinal (?:silhouettes?|contours?|shadows?|size|width|structures)|"
        r"(?:the )?(?:superior )?mediastinum",
    ),
    (
        (CM, ED),
        "heart size and pulmonary vascularity",
        r"(?:the )?(?:heart|heart size|cardiac silhouette|cardiac size) and (?:the )?(?:pulmonary )?"
        r"(?:vascularity|vasculature|vascular engorgement|vessels|vascular markings)",
    ),
    (
        (ED,),
        "pulmonary vascularity",
        r"(?:the )?(?:central |upper lobe |perihilar )?(?:pulmonary |lung )?(?:vascularity|"
        r"vasculature|vascular markings|venous markings)|(?:the )?(?:central )?pulmonary "
        r"(?:vessels|arteries|xxxx|veins)",
    ),
    (
        (CM,),
        "heart size",
        r"(?:the )?(?:heart|cardiac|cardiac silhouette|cardiac shadow|heart shadow|cardiac contours?|"
        r"heart silhouette|cardiac size|heart size|size of (?:the )?heart)(?: size)?",
    ),
    (
        (NF,),
        "chest",
        r"(?:the )?chest(?: (?:x-?ray|radiographs?|films?|study|exam(?:ination)?|x-xxxx|xxxx))?",
    ),
]
# Words that may stand between the subject and the predicate.
PREDICATE_GAP = (
    r"(?:\s+and (?:the )?(?:pulmonary |hilar )?(?:vasculature|vascularity|hila|hilar contours?|"
    r"pulmonary vessels|lungs))?(?:\s+(?:is|are|appears?|appear|remains?|remain|seems?|looks?|"
    r"again|otherwise|now|still|also|overall|grossly|stable and|both|to be|be|at|xxxx))*"
)
PREDICATE_ADVERBS = (
    r"(?:(?:mildly|slightly|moderately|markedly|severely|minimally|massively|significantly|"
    r"somewhat|at least|very|stably|persistently|again|not|probably|possibly|likely)\s+)*"
)
PREDICATE_BORDERLINE = (
    r"borderline(?: (?:enlarged|in size|size|prominent|normal|cardiomegaly))?|normal to (?:mildly |"
    r"slightly )?(?:enlarged|prominent)|(?:upper limits? (?:of )?normal|top normal) (?:or|to) "
    r"(?:mildly |slightly )?enlarged"
)
# "Upper limits of normal" is normal (the annotators do not index it); "borderline" is not.
PREDICATE_NORMAL = (
    r"(?:(?:at )?(?:the )?(?:upper|top|high|upper-|top-|high-) ?(?:limits? (?:of )?|end of |range of "
    r")?)?normal(?:[- ]sized?)?(?: (?:in|for) (?:size|contour|appearance|caliber)(?: and "
    r"(?:size|contour|appearance|configuration))?| size| limits)?|within normal (?:limits|size)(?: "
    r"(?:in|for) (?:size|contour|appearance)(?: and (?:size|contour|appearance))?)?|within the "
    r"normal range|within (?:the )?limits of normal|unremarkable|(?:of )?normal size"
)
PREDICATE_POSITIVE = (
    r"enlarged|widened|prominent|increased|large|enlarging|globular|abnormal|engorged|congested|"
    r"indistinct|distended|cephalized|redistributed"
)
# Prefixed forms use the same words before the subject.
PREFIX_WORDS = (
    r"normal(?:[- ]sized?)?|unremarkable|enlarged|widened|prominent|large|globular|abnormal|"
    r"borderline(?: enlarged)?|top[- ]normal|upper[- ]normal"
)
PREFIX_SUBJECTS: list[tuple[tuple[str, ...], str, str]] = [
    (
        (CM, ECM),
        "cardiomediastinal silhouette",
        r"(?:cardiac and mediastinal|heart and mediastinal|cardiomediastinal|cardio-mediastinal) "
        r"(?:silhouettes?|contours?|shadows?|size)",
    ),
    (
        (ECM,),
        "mediastinum",
        r"mediastinal (?:silhouettes?|contours?|shadows?|size|width)|(?:superior )?mediastinum",
    ),
    ((CM,), "heart size", r"(?:heart|cardiac) (?:size|silhouette|shadow|contours?)|heart(?! and)"),
    (
        (NF,),
        "chest",
        r"chest(?: (?:x-?ray|radiographs?|films?|study|exam(?:ination)?|x-xxxx|xxxx))?",
    ),
]

# ---------------------------------------------------------------------------------------------
# Cues. Each group is a list of regex fragments; the labeler compiles them into one alternation in
# this order so that a longer, more specific cue wins at the same position ("cannot be excluded"
# before "not", "no change" before "no").
PSEUDO_CUES = [
    r"no (?:(?:significant|appreciable|interval|definite|substantial|acute|radiographic|"
    r"substantial|overall) )*(?:change|increase|decrease|progression|worsening|improvement)",
    r"no (?:(?:significant|appreciable|interval|substantial|further) )+(?:enlargement|growth)",
    r"without (?:(?:significant|interval|appreciable) )*(?:change|increase|progression|"
    r"enlargement|growth)",
    r"not (?:only|necessarily|significantly changed|changed|increased|decreased)",
    r"no longer (?:enlarged|prominent)",
    r"age[- ]indeterminate|(?:of )?indeterminate age|uncertain age|unknown age",
    r"gram[- ]negative",
]
UNCERTAIN_POST_CUES = [
    r"(?:can ?not|can't|could not|may not) (?:be )?(?:entirely |completely |totally |definitely )?"
    r"(?:excluded|ruled out|exclude|rule out|excluded radiographically)",
    r"(?:is|are) not (?:entirely |completely )?(?:excluded|ruled out)",
    r"not (?:entirely |completely )?(?:excluded|ruled out)",
    r"(?:is|are) (?:also )?(?:possible|likely|suspected|questioned|suggested|considered|favored|not "
    r"certain|uncertain)",
    r"(?:may|might|could) (?:be|represent|reflect) (?:present|seen|developing)",
    r"(?:is|are|would be) (?:also )?(?:another |a |an additional )?(?:consideration|in the "
    r"differential(?: diagnosis)?|not excluded|difficult to exclude)",
    r"(?:would be|is|are) (?:a )?(?:possibility|possible)",
    r"(?:may|might|can|could) not be (?:well )?(?:demonstrated|visualized|seen|detected|apparent|"
    r"visible|identified)",
    r"\?",
]
UNCERTAIN_PRE_CUES = [
    r"(?:can ?not|can't|could not|difficult to|unable to) (?:be )?(?:entirely |completely |"
    r"totally |definitely )?(?:exclude|rule out|excluded|ruled out|assess for|evaluate for)",
    r"(?:may|might|could|can|would) (?:also |possibly |potentially |still )?(?:be |have )?"
    r"(?:represent(?:ing)?|reflect(?:ing)?|indicate|be|due to|related to|secondary to|"
    r"consistent with|suggest|relate to|attributed to|caused by|contain)",
    r"(?:may|might|could)",
    r"(?:possible|possibly|probable|probably|likely|presumably|presumed|presumptive|suspected|"
    r"suspect|suspicion (?:of|for)|concern for|"
    r"questionable|question of|questioned|equivocal|indeterminate|cannot exclude|differential "
    r"(?:diagnosis |diagnoses |considerations? |possibilities )?(?:(?:is|are) (?:xxxx |broad )?"
    r"(?:and )?)?(?:includes?|of|would include)|consider(?:ed|ing|ation)?|alternatively|"
    r"correlat(?:e|ed|ion|ing) (?:clinically )?(?:for|with)(?: (?:xxxx|signs|symptoms|history)(?: of)?)?|"
    r"clinical correlation (?:for|with)|(?:signs|symptoms) of|in the (?:appropriate |right )?"
    r"clinical (?:setting|context)|(?:cannot|can not|can't) differentiate|superimposed"
    r"|rule out|r/o|to exclude|evaluate for|evaluation (?:for|of)|assess for|"
    r"either|uncertain|unclear|favor(?:ed|s)?|maybe)",
]
# Negations that look both ways ("resolved edema", "edema, resolved").
NEGATION_BOTH_CUES = [r"resolved|cleared|disappeared"]
# "suggest"-like cues: uncertain on their own, but inside a negation ("no opacity to suggest
# pneumonia") the negation wins.
SUGGEST_CUES = [
    r"to suggest|suggest(?:s|ive of|ing|ed)?|to indicate|indicating|indicative of|(?:concerning|"
    r"worrisome|suspicious) for|typical (?:of|for)|characteristic of|diagnostic of",
]
NEGATION_POST_CUES = [
    r"(?:(?:is|are|was|were|has been|have been)\s+)?(?:not|no longer|never) (?:(?:well |clearly |"
    r"definitely |convincingly |currently |again |radiographically |otherwise |now )?)(?:seen|"
    r"visualized|visible|identified|present|evident|demonstrated|appreciated|noted|detected|"
    r"apparent|shown|observed|recognized|delineated|confirmed)",
    r"(?:has|have) (?:since |now |completely |nearly )?(?:resolved|cleared|disappeared)",
    r"(?:(?:has|have) been |was |were )?removed",
    r"(?:is|are|was|were) (?:absent|gone|excluded)",
    r"no longer",
]
NEGATION_PRE_CUES = [
    r"(?:no|without)(?:\s+(?:new|other|acute|definite|radiographic|convincing|obvious|residual|"
    r"evidence|visible|visualized|significant|focal|gross|overt|large|appreciable|clear|"
    r"discrete|suspicious|xxxx|signs?|findings?|interval development|development|persistent|"
    r"recurrent|further|additional|demonstrable|detectable|identifiable|apparent|frank|"
    r"displaced|definitive|change to suggest|features|areas?|displacement|more|sizable|"
    r"measurable|substantial|specific|dense|typical|of|for|to suggest|suggestion of|"
    r"any|remaining|longer|recurrence))*",
    r"(?:negative for|free of|clear of|clearing of|absence of|absent|resolution of|resolved|"
    r"removal of|interval removal of|rules out|ruled out|not|nor|neither|w/o)",
]
# Cues that look both ways ("atelectasis versus pneumonia": both uncertain).
UNCERTAIN_BOTH_CUES = [r"versus", r"vs\.?", r"or less likely", r"and/or"]
# Words that end the scope of a cue inside a sentence.
TERMINATORS = [
    r"but",
    r"however",
    r"although",
    r"though",
    r"except(?: for)?",
    r"aside from",
    r"apart from",
    r"other than",
    r"which",
    r"with",
    r"w/(?!o)",
    r"who",
    r"whereas",
    r"otherwise",
    r"while",
    r"there (?:is|are|has been|have been|was|were)",
    r"(?:is|are) (?:again )?(?:seen|noted|present|identified|unchanged|stable|visualized)",
    r"and (?:there|the|a|an|mild|moderate|severe|small|large|stable|persistent|new|increased)",
    r"again",
    r"persistent",
    r"stable",
    r"unchanged",
    r"seen",
    r"[;:]",
]

LATERALITY = {
    "left": "left",
    "right": "right",
    "bilateral": "bilateral",
    "bilaterally": "bilateral",
    "both": "bilateral",
    "bibasilar": "bilateral",
    "bibasal": "bilateral",
    "biapical": "bilateral",
    "bibasally": "bilateral",
    "biapically": "bilateral",
    "rul": "right",
    "rml": "right",
    "rll": "right",
    "lul": "left",
    "lll": "left",
}
SEVERITY = {
    "trace": "trace",
    "borderline": "mild",
    "tiny": "small",
    "small": "small",
    "smaller": "small",
    "mild": "mild",
    "mildly": "mild",
    "minimal": "mild",
    "minimally": "mild",
    "slight": "mild",
    "slightly": "mild",
    "moderate": "moderate",
    "moderately": "moderate",
    "large": "large",
    "massive": "large",
    "massively": "large",
    "severe": "severe",
    "severely": "severe",
    "marked": "severe",
    "markedly": "severe",
}

# ---------------------------------------------------------------------------------------------
# Rewriting vocabulary.
# Abbreviation <-> expansion pairs used by equivalent rewrites (both directions).
ABBREVIATIONS: list[tuple[str, str]] = [
    ("PA", "posteroanterior"),
    ("AP", "anteroposterior"),
    ("CHF", "congestive heart failure"),
    ("RUL", "right upper lobe"),
    ("RML", "right middle lobe"),
    ("RLL", "right lower lobe"),
    ("LUL", "left upper lobe"),
    ("LLL", "left lower lobe"),
    ("ETT", "endotracheal tube"),
    ("NGT", "nasogastric tube"),
    ("PICC", "peripherally inserted central catheter"),
    ("CABG", "coronary artery bypass graft"),
    ("COPD", "chronic obstructive pulmonary disease"),
    ("SVC", "superior vena cava"),
    ("IVC", "inferior vena cava"),
    ("CP", "costophrenic"),
    ("AC", "acromioclavicular"),
    ("CT", "computed tomography"),
    ("bilat", "bilateral"),
    ("w/", "with"),
    ("w/o", "without"),
    ("approx", "approximately"),
    ("lat", "lateral"),
    # Short forms of findings the Labeler reads either way, and of devices, anatomy and course.
    # (The evaluation's held-out lexicon, ``llmclip.eval.heldout.EVAL_ABBREVIATIONS``, shares none.)
    ("PTX", "pneumothorax"),
    ("PNA", "pneumonia"),
    ("NG", "nasogastric"),
    ("ET", "endotracheal"),
    ("IJ", "internal jugular"),
    ("CVC", "central venous catheter"),
    ("IV", "intravenous"),
    ("RA", "right atrium"),
    ("RV", "right ventricle"),
    ("CTR", "cardiothoracic ratio"),
    ("ILD", "interstitial lung disease"),
    ("TB", "tuberculosis"),
    ("CAD", "coronary artery disease"),
    ("HTN", "hypertension"),
    ("SOB", "shortness of breath"),
    ("f/u", "follow-up"),
    ("s/o", "suggestive of"),
    ("2/2", "secondary to"),
    ("wrt", "with respect to"),
    ("dist", "distal"),
    ("prox", "proximal"),
    ("med", "medial"),
    ("mm", "millimeters"),
    ("cm", "centimeters"),
    ("deg", "degrees"),
    ("resp", "respiratory"),
]
# Synonym pairs that keep every CheXpert observation the same (checked by the Labeler anyway).
SYNONYMS: list[tuple[str, str]] = [
    ("cardiomegaly", "enlarged cardiac silhouette"),
    ("pleural effusion", "pleural fluid collection"),
    ("pleural effusions", "pleural fluid collections"),
    ("pneumothorax", "pleural air collection"),
    ("atelectasis", "atelectatic change"),
    ("consolidation", "consolidative change"),
    ("pulmonary edema", "pulmonary oedema"),
    ("vascular congestion", "vascular engorgement"),
    ("opacity", "opacification"),
    ("opacities", "areas of opacification"),
    ("nodule", "nodular lesion"),
    ("heart size is normal", "heart is normal in size"),
    ("lungs are clear", "lungs are free of focal disease"),
    ("within normal limits", "normal"),
    ("no acute cardiopulmonary abnormality", "no acute cardiopulmonary process"),
    ("no acute disease", "no active disease"),
    ("bilateral", "bilaterally"),
    ("there is no", "no"),
    ("no evidence of", "no"),
]
# One-error "neighbour" findings: a finding replaced by a clinically different one nearby.
NEIGHBOURS: dict[str, str] = {
    "atelectasis": "consolidation",
    "consolidation": "atelectasis",
    "pneumonia": "pulmonary edema",
    "edema": "pneumonia",
    "pleural effusion": "pneumothorax",
    "effusion": "pneumothorax",
    "effusions": "pneumothoraces",
    "pneumothorax": "pleural effusion",
    "nodule": "fracture",
    "mass": "consolidation",
    "cardiomegaly": "pleural effusion",
    "fracture": "nodule",
    "granuloma": "pneumothorax",
}
# Devices that a one-error edit may add (as a sentence) - the canonical device words.
DEVICE_SENTENCES: list[str] = [
    "A right internal jugular central venous catheter terminates in the superior vena cava.",
    "A left chest wall pacemaker is present with leads in the right atrium and right ventricle.",
    "An endotracheal tube terminates 4 cm above the carina.",
    "A nasogastric tube courses below the diaphragm.",
    "A right-sided chest tube is in place.",
]

# ---------------------------------------------------------------------------------------------
# Report graph vocabulary (entities beyond the 14 CheXpert observations, anatomy, relations).
# (canonical name, regex). Findings that are not CheXpert classes but matter for the graph.
GRAPH_FINDINGS: list[tuple[str, str]] = [
    ("granuloma", r"(?:calcified )?granulomas?|granulomatous (?:disease|process|changes?|sequela)"),
    ("emphysema", r"emphysema(?:tous)?(?: changes?)?|bullous (?:disease|changes?)|bullae"),
    ("copd", r"copd|chronic obstructive (?:pulmonary|lung) disease"),
    ("hyperinflation", r"hyperinflat(?:ion|ed)|hyperexpan(?:sion|ded)|hyperaerat(?:ion|ed)"),
    ("hypoinflation", r"hypoinflat(?:ion|ed)|low lung volumes?|hypoventilat(?:ion|ory)"),
    ("calcification", r"calcifications?|calcified (?:lymph nodes?|nodes?|plaques?)"),
    (
        "degenerative change",
        r"degenerative (?:changes?|disease|spondylosis|disc disease)|spondylosis|osteophytes?",
    ),
    ("scoliosis", r"scoliosis|(?:dextro|levo)(?:scoliosis|curvature)"),
    ("kyphosis", r"kyphosis|kyphotic"),
    ("hiatal hernia", r"hiatal hernia|hiatus hernia"),
    (
        "tortuous aorta",
        r"(?:tortuous|ectatic|unfolded) (?:thoracic )?aorta|aortic (?:tortuosity|ectasia)",
    ),
    (
        "elevated hemidiaphragm",
        r"elevat(?:ed|ion of (?:the )?)(?:right |left )?(?:hemi)?diaphragms?|diaphragmatic eventration|"
        r"eventration",
    ),
    ("hilar prominence", r"hilar (?:prominence|fullness|enlargement)|prominent hil(?:a|um|ar)"),
    ("lymphadenopathy", r"(?:lymph)?adenopathy|enlarged lymph nodes?"),
    ("pericardial effusion", r"pericardial (?:effusion|fluid)"),
    ("pneumoperitoneum", r"pneumoperitoneum|free (?:intraperitoneal )?air"),
    ("subcutaneous emphysema", r"subcutaneous (?:emphysema|air)"),
    ("bronchiectasis", r"bronchiectasis"),
    ("osteopenia", r"osteopenia|demineraliz(?:ation|ed)|osteoporosis"),
    ("air bronchograms", r"air bronchograms?"),
]
# (canonical region, regex). Laterality is a separate modifier node.
ANATOMY: list[tuple[str, str]] = [
    ("upper lobe", r"upper lobes?|rul|lul"),
    ("middle lobe", r"middle lobe|rml"),
    ("lower lobe", r"lower lobes?|rll|lll"),
    ("lingula", r"lingula|lingular"),
    ("lung base", r"(?:lung )?bases?|basilar|bibasilar|basal|bibasal"),
    ("lung apex", r"(?:lung )?apex|apices|apical|biapical"),
    ("midlung", r"mid ?lungs?|mid lung zones?"),
    ("hilum", r"hil(?:um|a|ar)|perihilar|parahilar"),
    ("lung", r"lungs?|pulmonary parenchyma|hemithorax"),
    ("pleura", r"pleura|pleural space|fissures?"),
    ("costophrenic angle", r"costophrenic (?:angles?|sulc(?:us|i)|recess(?:es)?)"),
    ("retrocardiac", r"retrocardiac"),
    ("mediastinum", r"mediastinum|mediastinal|paratracheal"),
    ("heart", r"heart|cardiac|right atrium|right ventricle|atrium|ventricle|cavoatrial junction"),
    ("aorta", r"aorta|aortic (?:arch|knob)"),
    ("diaphragm", r"(?:hemi)?diaphragms?"),
    ("trachea", r"trachea|carina"),
    ("superior vena cava", r"superior vena cava|svc"),
    ("stomach", r"stomach|gastric"),
    ("spine", r"(?:thoracic |lumbar |cervical )?spine|vertebra(?:e|l bod(?:y|ies))?"),
    ("ribs", r"ribs?"),
    ("clavicle", r"clavicles?|clavicular"),
    ("chest wall", r"chest wall|soft tissues?"),
]
# Cues between two findings of a sentence that make the first suggestive of the second.
SUGGESTIVE_CUES = (
    r"(?:may|might|could|which may|that may|likely|most likely) (?:also )?(?:represent|reflect|be "
    r"due to|be secondary to|be related to|indicate|be)|represent(?:s|ing)?|reflect(?:s|ing)?|"
    r"consistent with|compatible with|suggest(?:s|ive of|ing)?|concerning for|worrisome for|"
    r"suspicious for|in keeping with|due to|secondary to|related to|likely|possibly|probably"
)
